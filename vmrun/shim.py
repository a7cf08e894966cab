"""The shim: the host process that stands for one guest process (a container's init or an exec).

Callers (containerd's shim, conmon) take the pid in --pid-file as the container's: they
reap it as their child, signal it, and read its exit status. So the shim relays the
caller's stdio (or a host pty whose master went to --console-socket) to the guest
process, forwards every signal it gets, turns terminal resizes into ResizeTty, and exits
with the guest process's status. It talks to the guest over the process's stream
(vmrun/common/process_stream.py), dialled straight through the pod's vsock transport,
and loads nothing but the standard library: one runs per container and exec. If the shim
is killed, the agent sees the stream vanish and kills the guest process too.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import tty
from typing import NamedTuple

from vmrun.errors import AgentError, VmrunError
from vmrun.ready_pipe import ReadyPipe
from vmrun.signals import forward_signals, wait_in_thread

# The shim process imports this module: what only its starters need is imported in place.

_READY_TIMEOUT = 30.0
_GO = b"GO"
# What a caller sees when the guest (or the agent) vanished under a process.
LOST_STATUS = 128 + signal.SIGKILL


class StartingShim:
    """A shim started ahead of its guest process: Python loads while the guest process is
    made. `go()` once it exists lets the shim attach, and returns its pid; `close()` before
    that sends it away."""

    def __init__(self, sandbox_dir: str, container_id: str, exec_id: str = "", *, console_socket: str = "",
                 netns: str = ""):
        from vmrun.proc import HelperProcess, stdlib_module_command

        self._ready = ReadyPipe()
        go_read, self._go_fd = os.pipe()
        argv, env = stdlib_module_command("vmrun.shim", "--sandbox-dir", sandbox_dir, "--container", container_id,
                                          "--ready-fd", str(self._ready.write_fd), "--go-fd", str(go_read))
        if exec_id:
            argv += ["--exec-id", exec_id]
        if console_socket:
            argv += ["--console-socket", console_socket]
        if netns:
            # The pid callers see lives in the container's network namespace, as with runc
            # (hooks configure the network through it: container_netns.py).
            argv = ["nsenter", f"--net={netns}", "--", *argv]
        # With a terminal, the process's stdio is the pty; our own stdout is the caller's
        # pipe for *our* output, which it reads to EOF before it takes the call as done:
        # the shim must not hold it. Without one, the shim relays the stdio it inherits.
        self._process = HelperProcess("shim", argv, env=env, pass_fds=(self._ready.write_fd, go_read),
                                      die_with_parent=False, inherit_stdio=not console_socket)
        try:
            self._process.start()
        except BaseException:
            self._ready.discard()
            os.close(self._go_fd)
            raise
        finally:
            os.close(go_read)
        self._went = False

    @property
    def pid(self) -> int:
        return self._process.pid

    def go(self) -> int:
        """The guest process exists: the shim attaches to it; its pid once it relays."""
        os.write(self._go_fd, _GO)
        os.close(self._go_fd)
        self._went = True
        try:
            self._ready.wait(self._process, _READY_TIMEOUT)
        except VmrunError:
            self._process.stop()
            raise
        return self._process.pid

    def close(self) -> None:
        """Send away the shim: one that never went (its guest process was not made), or one
        whose create failed after (a hook failed): it is stopped either way."""
        if not self._went:
            self._went = True
            os.close(self._go_fd)  # end of file: the shim exits without attaching
            self._ready.discard()
        self._process.stop()


def spawn_shim(sandbox_dir: str, container_id: str, exec_id: str = "", *, console_socket: str = "",
               netns: str = "", cgroup: str = "") -> int:
    """Start a shim for a guest process that exists (in `cgroup`, if any); its pid once it relays."""
    from vmrun.host_cgroup import HostCgroup

    shim = StartingShim(sandbox_dir, container_id, exec_id, console_socket=console_socket, netns=netns)
    try:
        if cgroup:
            HostCgroup(cgroup).join([shim.pid])
        return shim.go()
    except BaseException:
        shim.close()
        raise


def _send_console(console_socket: str) -> int:
    """Make a host pty, hand its master to the caller; the slave becomes our terminal."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(console_socket)
        socket.send_fds(conn, [name.encode()], [master])
    os.close(master)
    # Raw: the guest's pty does the line discipline; ours only carries bytes.
    tty.setraw(slave)
    # Our controlling terminal (we lead a new session), so a resize sends us SIGWINCH.
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    return slave


def _window_size(fd: int) -> tuple[int, int]:
    rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, columns


class _ShimArgs(NamedTuple):
    """What StartingShim passes (argparse alone would cost each shim ~1 MiB)."""

    sandbox_dir: str  # its guest may still boot: the transport's address is read after GO
    container: str
    ready_fd: int
    go_fd: int
    exec_id: str = ""
    console_socket: str = ""

    @classmethod
    def parse(cls, argv: list[str]) -> "_ShimArgs":
        given = {flag.removeprefix("--").replace("-", "_"): value for flag, value in zip(argv[::2], argv[1::2])}
        unknown = set(given) - set(cls._fields)
        if len(argv) % 2 or unknown:
            raise SystemExit(f"vmrun-shim: bad arguments {argv}")
        try:
            return cls(**{**given, "ready_fd": int(given["ready_fd"]), "go_fd": int(given["go_fd"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"vmrun-shim: bad or missing argument {exc}") from None


def main(argv: list[str] | None = None) -> None:
    from vmrun.hypervisor.vsock.dial import recorded_address
    from vmrun.stdio import open_process_stream

    args = _ShimArgs.parse(sys.argv[1:] if argv is None else argv)

    # Started ahead: wait until the guest process exists (end of file: it never will).
    if os.read(args.go_fd, len(_GO)) != _GO:
        os._exit(0)
    os.close(args.go_fd)
    terminal = bool(args.console_socket)
    try:
        stream = open_process_stream(recorded_address(args.sandbox_dir), args.container, args.exec_id)
    except VmrunError as exc:
        ReadyPipe.report(args.ready_fd, f"shim: {exc}")
        os._exit(1)
    try:
        if terminal:
            tty_fd = _send_console(args.console_socket)
            stdin, stdout, stderr = tty_fd, tty_fd, tty_fd

            def resize(*_: object) -> None:
                rows, columns = _window_size(tty_fd)
                if rows and columns:
                    stream.resize(rows, columns)

            signal.signal(signal.SIGWINCH, resize)
            resize()
        else:
            stdin, stdout, stderr = 0, 1, 2
    except OSError as exc:
        ReadyPipe.report(args.ready_fd, f"shim: cannot set up the terminal: {exc}")
        os._exit(1)

    ReadyPipe.report(args.ready_fd)
    try:
        with forward_signals(stream.signal):
            code = wait_in_thread(lambda: stream.relay(stdin=stdin, stdout=stdout, stderr=stderr,
                                                       terminal=terminal))
    except AgentError:
        code = LOST_STATUS
    # At once: no thread of ours may hold up the status the caller waits for.
    os._exit(code)


if __name__ == "__main__":
    main()
