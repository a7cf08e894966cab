"""The sandbox control socket: requests, results and one-line errors."""

from __future__ import annotations

import pytest

from vmrun.control import ControlError, ControlServer, control_call
from vmrun.errors import NetworkError


def refuse(request: dict) -> object:
    raise NetworkError(f"no pod interface {request['name']!r}")


@pytest.fixture
def server(tmp_path):
    control = ControlServer(tmp_path / "control.sock", {
        "echo": lambda request: {"got": request["value"]},
        "refuse": refuse,
        "crash": lambda request: 1 / 0,
    })
    yield control
    control.close()


def test_a_result_comes_back(server):
    assert control_call(server.path, "echo", value=[1, "two"]) == {"got": [1, "two"]}


def test_a_refusal_is_its_one_line_message(server):
    with pytest.raises(ControlError, match="^no pod interface 'net7'$"):
        control_call(server.path, "refuse", name="net7")


def test_unknown_ops_and_bugs_are_errors_and_the_server_goes_on(server):
    with pytest.raises(ControlError, match="unknown control request"):
        control_call(server.path, "nope")
    with pytest.raises(ControlError, match="internal error: ZeroDivisionError"):
        control_call(server.path, "crash")
    assert control_call(server.path, "echo", value=3) == {"got": 3}


def test_a_closed_sandbox_cannot_be_reached(server):
    server.close()
    assert not server.path.exists()
    with pytest.raises(ControlError, match="cannot reach "):
        control_call(server.path, "echo", value=1)


def test_a_file_at_the_socket_path_is_never_replaced(tmp_path):
    precious = tmp_path / "control.sock"
    precious.write_text("someone's data")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(precious, {})
    assert precious.read_text() == "someone's data"


def test_a_served_socket_is_not_taken_over_and_a_stale_one_is(server, tmp_path):
    with pytest.raises(ControlError, match="is served by another process already"):
        ControlServer(server.path, {})
    assert control_call(server.path, "echo", value=1) == {"got": 1}  # the first still serves
    import socket

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening: what a killed server leaves
    replacement = ControlServer(stale, {"echo": lambda request: request["value"]})
    try:
        assert control_call(stale, "echo", value=2) == 2
    finally:
        replacement.close()
