"""A task process's stdio where containerd asked for it: its FIFOs (ctr, CRI, docker),
a file (`file:///path`), or a logging binary (`binary:///path?key=value`, which gets
the process's stdout and stderr as fds 3 and 4 and says it is ready by closing fd 5).

Of each output FIFO the shim holds a reader of its own (never read), as containerd's runc
shim does: opening the writer never waits for containerd, and a containerd that restarts
finds the output where it left it instead of the process dying of SIGPIPE. The writers
close when the guest's output ends, so containerd reads EOF (CRI's ExecSync waits for it).
Stdin is read until containerd closes its end (CloseIO, or its writer going), then closed
in the guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import stat
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vmrun.errors import AgentError, VmrunError
from vmrun.stdio import ProcessStream, open_process_stream

log = logging.getLogger("vmrun.shimv2.io")

_STDIN_CHUNK = 256 * 1024
_BINARY_READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class IOPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class _StdinPump:
    """Reads the stdin FIFO into the guest process until EOF or close(). The open waits
    for containerd's writer, in the pump's thread; the reads never block, so close()
    (CloseIO, or the process gone while the caller's stdin stays open) ends the pump at
    once, after what is already in the FIFO."""

    def __init__(self, stream: ProcessStream, path: str):
        self._stream, self._path = stream, path
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._pump, name="shim-stdin", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            log.warning("stdin %s: %s", self._path, exc.strerror)
            return
        try:
            for data in self._chunks(fd):
                if not self._stream.write_stdin(data):
                    return  # the process is gone: nothing more to deliver
            self._stream.close_stdin()
        finally:
            os.close(fd)

    def _chunks(self, fd: int) -> Iterator[bytes]:
        """The FIFO's data as it comes, until EOF; once woken, only what is there already."""
        while True:
            ready, _, _ = select.select([fd, self._wake_r], [], [])
            if fd in ready:
                data = _read_now(fd)
                if data == b"":
                    return  # EOF: every writer closed
                if data:
                    yield data
            if self._wake_r in ready:
                while data := _read_now(fd):
                    yield data
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_now(fd: int) -> bytes | None:
    """What the FIFO holds now (b"" at EOF, None when nothing is there yet)."""
    try:
        return os.read(fd, _STDIN_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class ProcessIO:
    """The stdio of one guest process (a task's init or an exec), for as long as it runs."""

    def __init__(self, vsock_address: str, container_id: str, exec_id: str, paths: IOPaths):
        self._vsock_address, self._container_id, self._exec_id = vsock_address, container_id, exec_id
        self.paths = paths
        self._writers: list[int] = []  # closed once the output has ended
        self._readers: list[int] = []  # ours, of the FIFOs: closed with the process
        self._writers_lock = threading.Lock()
        self._logger: subprocess.Popen | None = None
        self._stream: ProcessStream | None = None
        self._relay: threading.Thread | None = None  # until the process exited and its output ended
        self._stdin: _StdinPump | None = None

    def start(self) -> "ProcessIO":
        """Open the outputs and start relaying (the guest keeps output until it is read)."""
        try:
            stdout, stderr = self._open_outputs()
            stream = self._stream = open_process_stream(self._vsock_address, self._container_id, self._exec_id)
        except BaseException:
            self.close()
            raise
        self._relay = threading.Thread(target=self._relay_then_close_writers, args=(stream, stdout, stderr),
                                       name="shim-io", daemon=True)
        self._relay.start()
        if self.paths.stdin:
            self._stdin = _StdinPump(stream, self.paths.stdin)
        return self

    def _relay_then_close_writers(self, stream: ProcessStream, stdout: int, stderr: int) -> None:
        try:
            stream.relay(stdin=None, stdout=stdout, stderr=stderr, terminal=self.paths.terminal)
        except AgentError as exc:
            log.debug("%s/%s: %s", self._container_id, self._exec_id, exc)
        self._close_writers()

    def _open_outputs(self) -> tuple[int, int]:
        stdout_uri = urllib.parse.urlparse(self.paths.stdout)
        if stdout_uri.scheme == "binary":
            return self._start_logger(stdout_uri)
        return self._open_output(self.paths.stdout), self._open_output(self.paths.stderr)

    def _open_output(self, where: str) -> int:
        if not where:
            fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        else:
            uri = urllib.parse.urlparse(where)
            if uri.scheme == "file":
                path = Path(urllib.parse.unquote(uri.path))
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            elif uri.scheme in ("", "fifo"):
                fd = self._open_fifo(urllib.parse.unquote(uri.path) if uri.scheme else where)
            else:
                raise VmrunError(f"task io: {where!r}: unsupported scheme {uri.scheme!r}")
        self._writers.append(fd)
        return fd

    def _open_fifo(self, path: str) -> int:
        """The FIFO's writer; its reader is kept (see the module's docstring)."""
        try:
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise VmrunError(f"task io: cannot open {path}: {exc.strerror}") from None
        self._readers.append(reader)
        if not stat.S_ISFIFO(os.fstat(reader).st_mode):
            raise VmrunError(f"task io: {path} is not a FIFO")
        writer = os.open(f"/proc/self/fd/{reader}", os.O_WRONLY | os.O_CLOEXEC)  # the same FIFO
        return writer

    def _start_logger(self, uri: urllib.parse.ParseResult) -> tuple[int, int]:
        out_r, out_w = _pipe_above_9()
        err_r, err_w = _pipe_above_9()
        ready_r, ready_w = _pipe_above_9()
        self._writers += [out_w, err_w]
        args = [f"{key}={value}" if value else key
                for key, values in urllib.parse.parse_qs(uri.query, keep_blank_values=True).items()
                for value in values]
        env = {**os.environ, "CONTAINER_ID": self._container_id,
               "CONTAINER_NAMESPACE": os.environ.get("VMRUN_SHIM_NAMESPACE", "")}
        try:
            # fds 3, 4 and 5 in the child, as containerd's logging binaries expect: placed by
            # bash (no Python may run between fork and exec in a threaded process; dash
            # takes no fd numbers above 9).
            self._logger = subprocess.Popen(
                ["/bin/bash", "-c", 'eval "exec 3<&$1 4<&$2 5>&$3 $1<&- $2<&- $3>&-"; shift 3; exec "$@"', "sh",
                 str(out_r), str(err_r), str(ready_w), urllib.parse.unquote(uri.path), *args],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(out_r, err_r, ready_w))
        except OSError as exc:
            raise VmrunError(f"task io: cannot start the logging binary {uri.path}: {exc.strerror}") from None
        finally:
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
        try:
            ready = threading.Thread(target=os.read, args=(ready_r, 1), daemon=True)
            ready.start()
            ready.join(_BINARY_READY_TIMEOUT)
            if ready.is_alive():
                raise VmrunError(f"task io: the logging binary {uri.path} did not get ready")
        finally:
            os.close(ready_r)
        return out_w, err_w

    def close_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin.close()
        elif self._stream is not None:
            self._stream.close_stdin()

    def wait_output(self) -> None:
        """Until the process's output has ended (and it exited)."""
        if self._relay is not None:
            self._relay.join()

    def _close_writers(self) -> None:
        with self._writers_lock:
            for fd in self._writers:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._writers = []

    def close(self) -> None:
        if self._stdin is not None:
            self._stdin.close()
        if self._relay is None or not self._relay.is_alive():
            self._close_writers()
        # else: still relaying (a process of the container's holds its output): the relay
        # closes them when it ends; closing under it could hand its fd to another file.
        for fd in self._readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers = []
        if self._logger is not None:
            try:
                self._logger.wait(5)
            except subprocess.TimeoutExpired:
                self._logger.kill()
                self._logger.wait()



def _pipe_above_9() -> tuple[int, int]:
    """A pipe whose ends are numbered 10 or more: a child's shell can move them to 3-5 and
    close them without touching either."""
    ends = []
    for fd in os.pipe2(os.O_CLOEXEC):
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]
