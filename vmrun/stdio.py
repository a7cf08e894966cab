"""Relays a guest process's stdio, signals and terminal size between host file
descriptors and the guest, over the process's stream (vmrun/common/process_stream.py),
until it exits."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import struct
import termios
import threading
import tty
from typing import Callable, Iterator

from vmrun.common.process_stream import (MAX_FRAME, STDIN_WINDOW, FrameSocket, Kind, Output, StreamError,
                                         attach_payload, pack_size, pack_u32, unpack_exit, unpack_output,
                                         unpack_u32)
from vmrun.errors import AgentError
from vmrun.signals import forward_signals, wait_in_thread

log = logging.getLogger("vmrun.stdio")
_ATTACH_TIMEOUT = 30.0


def write_all(fd: int, data: bytes | memoryview) -> bool:
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


class ProcessStream:
    """The host's end of one guest process's stream: attach, then relay until it exits."""

    def __init__(self, conn: socket.socket, container_id: str, exec_id: str = ""):
        self._frames = FrameSocket(conn)
        self._container_id = container_id
        self._exec_id = exec_id
        self._credit = STDIN_WINDOW
        self._credit_changed = threading.Condition()
        self._ended = False

    def attach(self) -> None:
        """Hold the process's outputs: from now on nothing it writes is lost."""
        self._frames.sock.settimeout(_ATTACH_TIMEOUT)
        try:
            self._frames.send(Kind.ATTACH, attach_payload(self._container_id, self._exec_id))
            frame = self._frames.receive()
        except (OSError, StreamError) as exc:
            raise AgentError(f"agent: cannot attach to the process: {exc}") from None
        self._frames.sock.settimeout(None)
        if frame is None:
            raise AgentError("agent: the guest closed the process stream")
        kind, payload = frame
        if kind == Kind.REFUSED:
            raise AgentError(f"agent: {bytes(payload[:512]).decode(errors='replace')}")
        if kind != Kind.ATTACHED:
            raise AgentError(f"agent: {kind.name} instead of ATTACHED")

    def signal(self, signum: int) -> None:
        self._send(Kind.SIGNAL, pack_u32(signum))

    def resize(self, rows: int, columns: int) -> None:
        self._send(Kind.RESIZE, pack_size(rows, columns))

    def _send(self, kind: Kind, payload: bytes = b"") -> None:
        try:
            self._frames.send(kind, payload)
        except OSError as exc:
            log.debug("process stream: cannot send %s: %s", kind.name, exc)

    def relay(self, *, stdin: int | None, stdout: int, stderr: int, terminal: bool) -> int:
        """Relay until the process exited and its outputs ended; its exit status.
        AgentError if the stream ends before (the guest or its agent went)."""
        if stdin is not None:
            # A daemon: a terminal's stdin may never reach EOF, and must not hold us up.
            threading.Thread(target=self._pump_stdin, args=(stdin,), name="stdin", daemon=True).start()
        outputs = {Output.STDOUT: stdout, Output.STDERR: stderr}
        writable = {Output.STDOUT: True, Output.STDERR: True}
        open_outputs = {Output.STDOUT} | (set() if terminal else {Output.STDERR})
        code: int | None = None
        try:
            while (frame := self._frames.receive()) is not None:
                kind, payload = frame
                if kind in (Kind.STDOUT, Kind.STDERR):
                    output = Output.STDOUT if kind == Kind.STDOUT else Output.STDERR
                    if writable[output] and not write_all(outputs[output], payload):
                        # Our reader is gone (`| head -1`): so is the process's, as with
                        # runc, where its next write gets SIGPIPE. What is in flight is dropped.
                        writable[output] = False
                        self._send(Kind.CLOSE_OUTPUT, bytes([output]))
                elif kind == Kind.STDIN_CREDIT:
                    with self._credit_changed:
                        self._credit = min(self._credit + unpack_u32(payload), STDIN_WINDOW)
                        self._credit_changed.notify_all()
                elif kind == Kind.OUTPUT_END:
                    open_outputs.discard(unpack_output(payload))
                elif kind == Kind.EXIT:
                    code = unpack_exit(payload)
                else:
                    raise StreamError(f"{kind.name} is not the guest's to send")
                if code is not None and not open_outputs:
                    # Everything is here. The guest closes next; stdin it never read makes
                    # that close a reset, which must not turn a finished run into an error.
                    break
        except (OSError, StreamError) as exc:
            raise AgentError(f"agent: the process stream broke: {exc}") from None
        finally:
            with self._credit_changed:
                self._ended = True
                self._credit_changed.notify_all()
            self._frames.close()
        if code is None or open_outputs:
            raise AgentError("agent: the process stream ended before the process did")
        return code

    def write_stdin(self, data: bytes | memoryview) -> bool:
        """Send `data` to the process's stdin, within the credit the guest grants (waiting
        for it); False once the stream has ended."""
        view = memoryview(data)
        while view:
            with self._credit_changed:
                self._credit_changed.wait_for(lambda: self._credit > 0 or self._ended)
                if self._ended:
                    return False
                count = min(self._credit, MAX_FRAME, len(view))
                self._credit -= count
            try:
                self._frames.send(Kind.STDIN, view[:count])
            except OSError:
                return False  # the stream ended: the process is gone
            view = view[count:]
        return True

    def close_stdin(self) -> None:
        self._send(Kind.STDIN_EOF)

    def _pump_stdin(self, fd: int) -> None:
        """Our stdin into the guest, as it comes, until EOF."""
        _widen_pipe(fd)
        while True:
            with self._credit_changed:
                self._credit_changed.wait_for(lambda: self._credit > 0 or self._ended)
                if self._ended:
                    return
                allowed = min(self._credit, MAX_FRAME)
            data = _read_some(fd, allowed)
            if not data:
                self.close_stdin()
                return
            if not self.write_stdin(data):
                return

    def close(self) -> None:
        """Drop the stream (the guest kills a process that has not exited)."""
        self._frames.close()


# A pipe holds 64 KiB unless asked: each read of one then makes a frame of at most that,
# and each frame costs the guest's agent a round of Python under TCG (300 MiB through a
# pipe took 6.4 s instead of 3.8 s from a file). Pipes may grow to 1 MiB unprivileged.
_STDIN_PIPE_SIZE = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Let a pipe on `fd` hold a frame's worth and more (never shrink it); anything else
    is left as it is."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < _STDIN_PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _STDIN_PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota, or not ours to change: small frames, still correct


def _read_some(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes of `fd` as they come; b"" at EOF (or when it cannot be read)."""
    while True:
        try:
            return os.read(fd, limit)
        except BlockingIOError:
            select.select([fd], [], [])
        except InterruptedError:
            continue
        except OSError:
            return b""


def open_process_stream(address: str, container_id: str, exec_id: str = "") -> ProcessStream:
    """Attach to a guest process through the pod's vsock transport at `address`."""
    from vmrun.common.process_stream import PROCESS_STREAM_PORT
    from vmrun.hypervisor.vsock.dial import dial

    stream = ProcessStream(dial(address, PROCESS_STREAM_PORT), container_id, exec_id)
    try:
        stream.attach()
    except BaseException:
        stream.close()
        raise
    return stream


@contextlib.contextmanager
def caller_terminal(resize_to: Callable[[int, int], None]) -> Iterator[None]:
    """The caller's terminal, for a guest process on a pty: raw (keys reach the guest's
    line discipline unchanged), its size followed on every SIGWINCH, restored on exit."""
    fd = caller_terminal_fd()
    if fd is None:
        yield
        return

    def resize(*_: object) -> None:
        rows, columns = window_size(fd)
        if rows and columns:
            resize_to(rows, columns)

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


def relay_until_exit(address: str, container_id: str, exec_id: str = "", *, stdin: int | None,
                     stdout: int, stderr: int, terminal: bool,
                     attached: Callable[[ProcessStream], None] = lambda _stream: None,
                     follow_caller_terminal: bool = False) -> int:
    """Relay stdio and forward signals until the guest process exits; its exit status.

    `attached` runs once the process's outputs are held (e.g. to start the container),
    so no output can be missed. With `follow_caller_terminal` (a foreground `run` or
    `exec -t`), the caller's terminal is made raw and its size followed meanwhile.
    """
    stream = open_process_stream(address, container_id, exec_id)
    with caller_terminal(stream.resize) if terminal and follow_caller_terminal else contextlib.nullcontext():
        with forward_signals(stream.signal):
            attached(stream)
            return wait_in_thread(lambda: stream.relay(stdin=stdin, stdout=stdout, stderr=stderr,
                                                       terminal=terminal))
