"""ProcessRef: a pid trusted and signalled only while it names the process recorded."""

import logging
import os
import signal
import subprocess

import pytest

from vmrun.process_ref import GONE, ProcessRef, wait_until_gone


@pytest.fixture
def sleeper():
    """A child that runs until the test ends (and no longer)."""
    child = subprocess.Popen(["sleep", "60"])
    yield child
    child.kill()
    child.wait()


def still_running(child: subprocess.Popen) -> bool:
    """Whether `child` runs a moment later (a signal sent would have ended it by then)."""
    try:
        child.wait(timeout=0.3)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_a_live_child_is_alive_and_gets_the_signal(sleeper):
    ref = ProcessRef.of(sleeper.pid)
    assert ref.verified and ref.start_time >= 0
    assert ref.alive()
    assert ref.signal(signal.SIGTERM)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_its_start_time_is_field_22_of_proc_stat(sleeper):
    fields = open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()
    assert ProcessRef.of(sleeper.pid).start_time == int(fields[19])


def test_a_pid_now_held_by_another_process_is_neither_alive_nor_signalled(sleeper):
    gone = subprocess.Popen(["true"])
    gone_ref = ProcessRef.of(gone.pid)  # taken before it is reaped
    gone.wait()
    assert not gone_ref.alive() and not gone_ref.signal(signal.SIGKILL)
    # The kernel cannot be made to reuse a pid on demand: the sleeper stands for the process
    # that took the pid over, named by a ref with its pid and its predecessor's start time.
    current = ProcessRef.of(sleeper.pid)
    assert current.start_time > 0
    stale = ProcessRef(sleeper.pid, current.start_time - 1)
    assert not stale.alive()
    for signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1):
        assert not stale.signal(signum)
    assert wait_until_gone([stale], 0) == []
    assert still_running(sleeper) and current.alive()


def test_a_zombie_is_not_alive():
    child = subprocess.Popen(["true"])
    ref = ProcessRef.of(child.pid)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert ref.verified and not ref.alive()
    child.wait()


def test_a_ref_taken_after_its_process_went_is_never_alive():
    child = subprocess.Popen(["true"])
    child.wait()
    ref = ProcessRef.of(child.pid)
    assert ref.start_time == GONE
    assert not ref.alive() and not ref.signal(signal.SIGTERM)
    assert not ProcessRef(0).alive() and not ProcessRef(0).signal(0)


def test_an_unknown_start_time_trusts_the_pid_but_never_kills_it(sleeper, caplog):
    """A state file from an older vmrun has no start times: as before, the pid is taken as
    it stands, but SIGKILL is not sent to a pid that may have been reused."""
    ref = ProcessRef(sleeper.pid)
    assert not ref.verified and ref.alive()
    with caplog.at_level(logging.WARNING, logger="vmrun.process"):
        assert not ref.signal(signal.SIGKILL)
    assert "not sending SIGKILL" in caplog.text
    assert still_running(sleeper)
    assert ref.signal(signal.SIGTERM)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_wait_until_gone_returns_those_still_running(sleeper):
    quick = subprocess.Popen(["true"])
    quick_ref, sleeper_ref = ProcessRef.of(quick.pid), ProcessRef.of(sleeper.pid)
    reaper = os.waitpid(quick.pid, 0)  # gone for good
    assert reaper[0] == quick.pid
    assert wait_until_gone([quick_ref, sleeper_ref], 0.1) == [sleeper_ref]
