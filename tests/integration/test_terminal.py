"""A container with a terminal: the pty master goes to --console-socket, as runc does;
keys and output cross it, and a resize of the caller's terminal reaches the guest's."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import termios
import time

import pytest

pytestmark = pytest.mark.integration


def read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_console_socket_terminal_and_resize(vm_env):
    bundle = vm_env.bundle("tty", ["sh", "-c", "tty; stty size; read line; echo got:$line; stty size"],
                           terminal=True)
    console = vm_env.base / "console.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(console))
    listener.listen(1)
    listener.settimeout(180)
    create = vm_env.popen("create", "--bundle", str(bundle), "--console-socket", str(console), "tty",
                          stdin=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        master = fds[0]
        set_size(master, 30, 100)
        assert create.wait(180) == 0
        assert vm_env.vmrun("start", "tty").returncode == 0
        out = read_until(master, b"30 100")
        assert b"/dev/pts/" in out
        set_size(master, 40, 120)
        time.sleep(0.5)  # SIGWINCH -> the shim -> ResizeTty in the guest
        os.write(master, b"hello\r")
        out = read_until(master, b"40 120")
        assert b"got:hello" in out
        os.close(master)
    finally:
        if create.poll() is None:
            create.kill()
        listener.close()
    deadline = time.monotonic() + 30
    while b'"stopped"' not in vm_env.vmrun("state", "tty").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert vm_env.vmrun("delete", "tty").returncode == 0


def test_exec_with_a_terminal_for_a_64_character_id(vm_env):
    """Callers' container ids are 64 hex characters: no socket path may outgrow 108 bytes."""
    container_id = "f" * 64
    bundle = vm_env.bundle("longid", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), container_id, detached=True).returncode == 0
    assert vm_env.vmrun("start", container_id).returncode == 0
    console = vm_env.base / "exec-console.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(console))
    listener.listen(1)
    listener.settimeout(60)
    process = vm_env.base / "process.json"
    process.write_text('{"args": ["sh", "-c", "tty; echo exec-tty-ok"], "cwd": "/", "env": ["PATH=/bin"],'
                       ' "user": {"uid": 0, "gid": 0}, "terminal": true}')
    exec_ = vm_env.popen("exec", "--process", str(process), "--detach", "--tty", "--console-socket", str(console),
                         container_id, stdin=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        assert exec_.wait(60) == 0
        out = read_until(fds[0], b"exec-tty-ok")
        assert b"/dev/pts/" in out
        os.close(fds[0])
    finally:
        if exec_.poll() is None:
            exec_.kill()
        listener.close()
    assert vm_env.vmrun("delete", "--force", container_id).returncode == 0
