import threading

import pytest

from vmrun.threads import InThread


def test_result_is_what_the_function_returned_in_its_own_thread():
    callers = []
    started = InThread(lambda: callers.append(threading.current_thread()) or 42, "answer")
    assert started.result() == 42
    assert callers[0] is not threading.main_thread()


def test_the_functions_exception_is_raised_by_result():
    failing = InThread(lambda: 1 / 0, "divide")
    with pytest.raises(ZeroDivisionError):
        failing.result(poll=0.01)


def test_it_runs_before_anyone_asks_for_the_result():
    ran = threading.Event()
    InThread(ran.set, "eager")
    assert ran.wait(5)
