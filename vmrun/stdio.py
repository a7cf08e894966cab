"""Relays a guest process's stdio to host file descriptors."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import struct
import termios
import threading
import tty
from typing import Callable, Iterator

from vmrun.agent import agent_pb2 as pb
from vmrun.agent.client import AgentClient
from vmrun.errors import AgentError
from vmrun.signals import forward_signals, wait_in_thread

_STDIN_CHUNK = 256 * 1024
log = logging.getLogger("vmrun.stdio")

def _write_all(fd: int, data: bytes) -> bool:
    """Write everything; False once the reader is gone (then the rest is drained)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])  # a non-blocking fd we were handed: wait, don't drop
        except InterruptedError:
            continue
        except OSError:
            return False
    return True


class StdioRelay:
    """Pumps stdout/stderr from the guest to host fds, and host stdin into the guest."""

    def __init__(self, agent: AgentClient, container_id: str, exec_id: str = "", *,
                 stdin: int | None, stdout: int, stderr: int, terminal: bool):
        self._agent = agent
        self._container_id = container_id
        self._exec_id = exec_id
        self._stdin = stdin
        self._outputs = [(pb.STDOUT, stdout)] + ([] if terminal else [(pb.STDERR, stderr)])
        self._output_threads: list[threading.Thread] = []
        self.error: AgentError | None = None

    def start(self) -> "StdioRelay":
        for stream, fd in self._outputs:
            thread = threading.Thread(target=self._pump_output, args=(stream, fd), daemon=True)
            thread.start()
            self._output_threads.append(thread)
        if self._stdin is not None:
            # A daemon: a terminal's stdin may never reach EOF, and must not hold us up.
            threading.Thread(target=self._pump_stdin, daemon=True).start()
        return self

    def _pump_output(self, stream: int, fd: int) -> None:
        writable = True
        try:
            for data in self._agent.read_output(self._container_id, stream, self._exec_id):
                if writable and not _write_all(fd, data):
                    # Our reader is gone (`| head -1`): so is the process's, as with runc,
                    # where its next write gets SIGPIPE. What is in flight is drained.
                    writable = False
                    self._agent.close_output(self._container_id, stream, self._exec_id)
        except AgentError as exc:
            self.error = exc

    def _pump_stdin(self) -> None:
        assert self._stdin is not None
        try:
            self._agent.stream_stdin(self._container_id, self._stdin_chunks(), self._exec_id)
            self._agent.close_stdin(self._container_id, self._exec_id)
        except AgentError:
            pass  # the process is gone or closed its stdin: nothing more to deliver

    def _stdin_chunks(self) -> Iterator[bytes]:
        """Our stdin, as it comes, until EOF."""
        assert self._stdin is not None
        while True:
            try:
                data = os.read(self._stdin, _STDIN_CHUNK)
            except BlockingIOError:
                select.select([self._stdin], [], [])
                continue
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                return
            yield data

    def output_running(self) -> bool:
        return any(thread.is_alive() for thread in self._output_threads)

    def wait_output(self) -> None:
        """Wait until every output stream has reached EOF; AgentError if one broke off."""
        for thread in self._output_threads:
            thread.join()
        if self.error is not None:
            raise self.error


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal `fd`; (0, 0) if it is none or says nothing."""
    try:
        rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 0, 0
    return rows, columns


def caller_terminal_fd() -> int | None:
    """The caller's terminal among our stdin and stdout (`vmrun run -t` typed at a shell)."""
    return next((fd for fd in (0, 1) if os.isatty(fd)), None)


def console_size(fd: int | None) -> dict | None:
    """The spec's process.consoleSize for a guest pty opened at the caller's terminal's size:
    the process sees it from its first instruction, before any resize could arrive."""
    rows, columns = window_size(fd) if fd is not None else (0, 0)
    return {"height": rows, "width": columns} if rows and columns else None


@contextlib.contextmanager
def caller_terminal(agent: AgentClient, container_id: str, exec_id: str = "") -> Iterator[None]:
    """The caller's terminal, for a guest process on a pty: raw (keys reach the guest's
    line discipline unchanged), its size followed on every SIGWINCH, restored on exit."""
    fd = caller_terminal_fd()
    if fd is None:
        yield
        return

    def resize(*_: object) -> None:
        rows, columns = window_size(fd)
        if rows and columns:
            try:
                agent.resize_tty(container_id, rows, columns, exec_id)
            except AgentError:
                pass  # the process is gone: nothing left to size

    saved = termios.tcgetattr(fd) if fd == 0 else None
    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        if saved is not None:
            tty.setraw(fd)
        resize()  # it may have changed since the pty was made
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay_until_exit(agent: AgentClient, container_id: str, exec_id: str = "", *, stdin: int | None,
                     stdout: int, stderr: int, terminal: bool,
                     attached: Callable[[], None] = lambda: None, follow_caller_terminal: bool = False) -> int:
    """Relay stdio and forward signals until the guest process exits; its exit status.

    `attached` runs once the output streams are attached (e.g. to start the container),
    so no output can be missed. With `follow_caller_terminal` (a foreground `run` or
    `exec -t`), the caller's terminal is made raw and its size followed meanwhile.
    """
    with caller_terminal(agent, container_id, exec_id) if terminal and follow_caller_terminal \
            else contextlib.nullcontext():
        return _relay(agent, container_id, exec_id, stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal,
                      attached=attached)


def _relay(agent: AgentClient, container_id: str, exec_id: str, *, stdin: int | None, stdout: int, stderr: int,
           terminal: bool, attached: Callable[[], None]) -> int:
    relay = StdioRelay(agent, container_id, exec_id, stdin=stdin, stdout=stdout, stderr=stderr,
                       terminal=terminal).start()

    def deliver(signum: int) -> None:
        try:
            agent.signal_process(container_id, signum, exec_id)
        except AgentError as exc:
            log.warning("could not forward signal %d: %s", signum, exc)

    with forward_signals(deliver):
        attached()
        code = wait_in_thread(lambda: agent.wait_process(container_id, exec_id))
    relay.wait_output()
    return code
