"""The host's wait for the agent's READY line (Sandbox._wait_ready's accept loop)."""

from __future__ import annotations

import socket
import time

import pytest

from vmrun.sandbox import accept_greeting


def listening(tmp_path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "ready.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    return listener, path


def deadline_check(seconds: float, calls: list[float]):
    """A check_guest that gives up after `seconds`, and notes each call."""
    deadline = time.monotonic() + seconds

    def check() -> None:
        calls.append(time.monotonic())
        if time.monotonic() > deadline:
            raise TimeoutError("the test's guest is not ready")

    return check


def test_a_connection_the_agent_gave_up_on_is_skipped(tmp_path):
    # Under load the agent's connect times out in the guest after the host accepted it:
    # the agent closes that connection and dials again.
    listener, path = listening(tmp_path)
    abandoned = socket.socket(socket.AF_UNIX)
    abandoned.connect(path)
    abandoned.close()
    second = socket.socket(socket.AF_UNIX)
    second.connect(path)
    second.sendall(b"READY 0.1.0 uptime=1.5\nafter")
    calls: list[float] = []
    conn, greeting = accept_greeting(listener, deadline_check(10, calls))
    assert greeting == b"READY 0.1.0 uptime=1.5\n"
    assert conn.recv(16) == b"after"  # what follows the line is left in the connection
    assert len(calls) == 1  # the guest was checked after the abandoned connection
    for sock in (conn, second, listener):
        sock.close()


def test_the_wait_ends_when_the_guest_check_says_so(tmp_path):
    listener, path = listening(tmp_path)
    abandoned = socket.socket(socket.AF_UNIX)
    abandoned.connect(path)
    abandoned.close()
    calls: list[float] = []
    with pytest.raises(TimeoutError, match="not ready"):
        accept_greeting(listener, deadline_check(0.3, calls))
    # Checked after the abandoned connection, then at each empty wait until the deadline.
    assert len(calls) > 2
    listener.close()


def test_anything_but_silence_is_handed_back(tmp_path):
    listener, path = listening(tmp_path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.sendall(b"HELLO\n")
    conn, greeting = accept_greeting(listener, deadline_check(10, []))
    assert greeting == b"HELLO\n"  # the caller refuses it
    for sock in (conn, client, listener):
        sock.close()


class KernelVsockListener:
    """A listener as kernel vsock's: each accepted connection comes with its peer's
    (CID, port); here the CIDs are said in advance, one per connection."""

    def __init__(self, listener: socket.socket, peer_cids: list[int]):
        self.listener, self.peer_cids = listener, peer_cids

    def settimeout(self, seconds: float) -> None:
        self.listener.settimeout(seconds)

    def accept(self):
        conn, _ = self.listener.accept()
        return conn, (self.peer_cids.pop(0), 1234)


def test_a_ready_line_from_another_guest_is_not_taken(tmp_path):
    from vmrun.hypervisor.vsock.kernel import KernelVsock

    listener, path = listening(tmp_path)
    impostor = socket.socket(socket.AF_UNIX)
    impostor.connect(path)
    impostor.sendall(b"READY 0.1.0 uptime=0.1\n")
    ours = socket.socket(socket.AF_UNIX)
    ours.connect(path)
    ours.sendall(b"READY 0.1.0 uptime=2.0\n")
    transport = KernelVsock(guest_cid=7)
    conn, greeting = accept_greeting(KernelVsockListener(listener, [9, 7]), deadline_check(10, []),
                                     transport.is_guest)
    assert greeting == b"READY 0.1.0 uptime=2.0\n"
    try:
        assert impostor.recv(16) == b""  # closed unheard
    except ConnectionResetError:
        pass  # closed unheard, with its line unread
    for sock in (conn, impostor, ours, listener):
        sock.close()
