"""The host's wait for the agent's READY line (Sandbox._wait_ready's accept loop)."""

from __future__ import annotations

import socket
import threading

import pytest

from vmrun.sandbox import accept_greeting


def listening(tmp_path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "ready.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    return listener, path


def test_a_connection_the_agent_gave_up_on_is_skipped(tmp_path):
    # Under load the agent's connect times out in the guest after the host accepted it:
    # the agent closes that connection and dials again.
    listener, path = listening(tmp_path)
    clients = []

    def agent() -> None:
        abandoned = socket.socket(socket.AF_UNIX)
        abandoned.connect(path)
        abandoned.close()
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        second.sendall(b"READY 0.1.0 uptime=1.5\nafter")
        clients.append(second)

    thread = threading.Thread(target=agent)
    thread.start()
    checks = []
    conn, greeting = accept_greeting(listener, lambda: checks.append(1))
    thread.join()
    assert greeting == b"READY 0.1.0 uptime=1.5\n"
    assert conn.recv(16) == b"after"  # what follows the line is left in the connection
    conn.close()
    clients[0].close()
    listener.close()


def test_the_wait_ends_when_the_guest_check_says_so(tmp_path):
    listener, path = listening(tmp_path)
    abandoned = socket.socket(socket.AF_UNIX)
    abandoned.connect(path)
    abandoned.close()

    def guest_gone() -> None:
        raise RuntimeError("QEMU exited")

    with pytest.raises(RuntimeError, match="QEMU exited"):
        accept_greeting(listener, guest_gone)
    listener.close()


def test_anything_but_silence_is_handed_back(tmp_path):
    listener, path = listening(tmp_path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.sendall(b"HELLO\n")
    conn, greeting = accept_greeting(listener, lambda: None)
    assert greeting == b"HELLO\n"  # the caller refuses it
    conn.close()
    client.close()
    listener.close()
