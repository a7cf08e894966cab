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


def _in_a_terminal(vm_env, *args: str, rows: int = 33, columns: int = 111) -> tuple[subprocess.Popen, int]:
    """vmrun ARGS on a pty of the test's (its controlling terminal, as typed at a shell)."""
    master, slave = os.openpty()
    set_size(master, rows, columns)
    process = subprocess.Popen([*vm_env.cli(), *args], stdin=slave, stdout=slave, stderr=slave, env=vm_env.env,
                               start_new_session=True,
                               preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    return process, master


def _raw(master: int) -> bool:
    lflag = termios.tcgetattr(master)[3]
    return not lflag & (termios.ICANON | termios.ECHO)


def _terminal_session(vm_env, process: subprocess.Popen, master: int) -> bytes:
    try:
        out = read_until(master, b"33 111")  # the size from the first instruction
        assert _raw(master), "the caller's terminal is not raw while the guest process runs"
        set_size(master, 40, 120)  # the kernel sends the foreground group (vmrun) SIGWINCH
        time.sleep(0.5)
        os.write(master, b"hello\r")
        out += read_until(master, b"40 120")
        assert process.wait(60) == 7, out
        assert not _raw(master), "the caller's terminal was not restored"
        return out
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)


def test_run_in_a_terminal_is_raw_sized_and_follows_resizes(vm_env):
    bundle = vm_env.bundle("fgtty", ["sh", "-c", "stty size; read line; echo got:$line; stty size; exit 7"],
                           terminal=True)
    process, master = _in_a_terminal(vm_env, "run", "--bundle", str(bundle), "fgtty")
    out = _terminal_session(vm_env, process, master)
    assert b"got:hello" in out and b"Traceback" not in out


def test_exec_t_in_a_terminal_is_raw_sized_and_follows_resizes(vm_env):
    bundle = vm_env.bundle("fgexec", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "fgexec", detached=True).returncode == 0
    try:
        assert vm_env.vmrun("start", "fgexec").returncode == 0
        process, master = _in_a_terminal(vm_env, "exec", "-t", "fgexec", "sh", "-c",
                                         "stty size; read line; echo got:$line; stty size; exit 7")
        out = _terminal_session(vm_env, process, master)
        assert b"got:hello" in out
    finally:
        assert vm_env.vmrun("delete", "--force", "fgexec").returncode == 0
