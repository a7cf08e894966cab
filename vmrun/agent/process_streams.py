"""The guest's end of process streams (vmrun/common/process_stream.py): the host process
standing for a guest process attaches to it over one vsock connection, and gets its
output, exit status and stdin credit, and sends its stdin, signals and terminal size.

One thread per connection reads the host's frames; one per output pumps the process's
pipe (or pty) into frames; one writes stdin into the process, so a process that does not
read its stdin holds up nothing else; one waits for the exit.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
from signal import SIGKILL
from typing import Callable

from vmrun.agent.service import AgentService, GuestProcess, InvalidArgument, NotFound, SharedFd
from vmrun.common.process_stream import (MAX_FRAME, OUTPUT_KINDS, STDIN_WINDOW, FrameSocket, Kind, Output,
                                         StreamError, pack_exit, pack_u32, parse_attach, unpack_output,
                                         unpack_size, unpack_u32)

_ATTACH_TIMEOUT = 10.0
_MAX_SIGNAL = 64


class _Wake:
    """Wakes one output pump from its poll (its host reader or the host went): an idle
    pump sleeps until then instead of waking on a timer, which costs every idle guest CPU
    under TCG."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with self._lock:
            if not self._closed:  # its fds are never written once closed (their numbers move on)
                try:
                    os.write(self._write, b"x")
                except BlockingIOError:
                    pass  # already awake

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._read)
            os.close(self._write)


class ProcessStreamServer:
    """Accepts process streams on `listener` (a vsock socket of the agent's port)."""

    def __init__(self, listener: socket.socket, service: AgentService, log: Callable[[str], None]):
        self._listener = listener
        self._service = service
        self._log = log

    def start(self) -> "ProcessStreamServer":
        threading.Thread(target=self._accept_loop, name="process-streams", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                self._log(f"process streams: accept failed: {exc}")
                return
            threading.Thread(target=self._serve, args=(conn,), name="process-stream", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        frames = FrameSocket(conn)
        try:
            conn.settimeout(_ATTACH_TIMEOUT)
            first = frames.receive()
            if first is None or first[0] != Kind.ATTACH:
                return
            container_id, exec_id = parse_attach(first[1])
            try:
                process = self._service.process(container_id, exec_id)
            except NotFound as exc:
                frames.send(Kind.REFUSED, str(exc).encode())
                return
            conn.settimeout(None)
            ProcessStream(frames, process, self._service).run()
        except (OSError, StreamError) as exc:
            self._log(f"process stream: {exc}")
        finally:
            frames.close()


class ProcessStream:
    """One attached host process: serves it until the process exited and its output ended,
    or until the host went away (then the process is killed: nobody stands for it)."""

    def __init__(self, frames: FrameSocket, process: GuestProcess, service: AgentService):
        self._frames = frames
        self._process = process
        self._service = service
        self._host_gone = threading.Event()
        self._exit_sent = threading.Event()
        self._parts_left = 1  # the exit, then one per output
        self._parts_lock = threading.Lock()
        self._stdin: queue.Queue[bytes | None] = queue.Queue()
        self._stdin_pending = 0  # received from the host, not yet credited back
        self._stdin_lock = threading.Lock()
        self._wakes = {Output.STDOUT: _Wake(), Output.STDERR: _Wake()}

    def _end_host(self) -> None:
        """The host's side is gone (or said everything it will): the pumps let go."""
        self._host_gone.set()
        for wake in self._wakes.values():
            wake.set()

    def run(self) -> None:
        outputs: list[tuple[Output, SharedFd]] = []
        ended: list[Output] = []  # closed already (or none): said at once
        for output, stream in ((Output.STDOUT, self._process.stdout),
                               (Output.STDERR, None if self._process.terminal else self._process.stderr)):
            if stream is not None and stream.acquire():
                outputs.append((output, stream))
            elif output == Output.STDOUT or not self._process.terminal:
                ended.append(output)
        self._parts_left += len(outputs)
        for output in set(self._wakes) - {output for output, _ in outputs}:
            self._wakes[output].close()  # no pump of its own to wake
        try:
            self._frames.send(Kind.ATTACHED)
            for output in ended:
                self._frames.send(Kind.OUTPUT_END, bytes([output]))
        except OSError:
            for output, stream in outputs:
                stream.release()
                self._wakes[output].close()
            raise
        for output, stream in outputs:
            threading.Thread(target=self._pump_output, args=(output, stream), name="stream-output",
                             daemon=True).start()
        threading.Thread(target=self._wait_exit, name="stream-exit", daemon=True).start()
        threading.Thread(target=self._write_stdin, name="stream-stdin", daemon=True).start()
        try:
            self._read_host()
        finally:
            self._end_host()
            self._stdin.put(None)
            if not self._exit_sent.is_set():
                self._service.kill(self._process, SIGKILL)

    # ---- from the host ----

    def _read_host(self) -> None:
        while (frame := self._frames.receive()) is not None:
            kind, payload = frame
            if kind == Kind.STDIN:
                with self._stdin_lock:
                    self._stdin_pending += len(payload)
                    if self._stdin_pending > STDIN_WINDOW:
                        raise StreamError("stdin sent beyond the credit granted")
                self._stdin.put(bytes(payload))
            elif kind == Kind.STDIN_EOF:
                self._stdin.put(None)
            elif kind == Kind.SIGNAL:
                signum = unpack_u32(payload)
                if 0 < signum <= _MAX_SIGNAL:
                    self._service.kill(self._process, signum)
            elif kind == Kind.RESIZE:
                rows, columns = unpack_size(payload)
                try:
                    self._process.resize(rows, columns)
                except (InvalidArgument, OSError):
                    pass  # no terminal, or it is gone: nothing left to size
            elif kind == Kind.CLOSE_OUTPUT:
                self._process.close_output(stdout=unpack_output(payload) == Output.STDOUT)
            else:
                raise StreamError(f"{kind.name} is not the host's to send")

    def _write_stdin(self) -> None:
        """Into the process, in order; each write credited back to the host. After a failed
        write (the process closed its stdin) the rest is credited and dropped."""
        writable = True
        while (data := self._stdin.get()) is not None:
            if writable:
                try:
                    self._process.write_stdin(data)
                except (InvalidArgument, OSError):
                    writable = False
            with self._stdin_lock:
                self._stdin_pending -= len(data)
            try:
                self._frames.send(Kind.STDIN_CREDIT, pack_u32(len(data)))
            except OSError:
                return
        if not self._host_gone.is_set():
            try:
                self._process.close_stdin()
            except (InvalidArgument, OSError):
                pass

    # ---- to the host ----

    def _pump_output(self, output: Output, stream: SharedFd) -> None:
        wake = self._wakes[output]
        poller = select.poll()
        poller.register(stream.fd, select.POLLIN)
        poller.register(wake.fileno(), select.POLLIN)
        kind = OUTPUT_KINDS[output]
        stream.notify_on_close(wake.set)  # the container removed, or its reader gone
        host_gone = False
        try:
            while not stream.closed and not self._host_gone.is_set():
                if any(fd == wake.fileno() for fd, _ in poller.poll()):
                    continue  # the loop's condition says why
                try:
                    data = os.read(stream.fd, MAX_FRAME)
                except BlockingIOError:  # a non-blocking fd (crun's pty master may be one)
                    continue
                except OSError:  # EIO: a pty whose other side closed; anything else ends it too
                    break
                if not data:
                    break
                self._frames.send(kind, data)
        except OSError:  # the host's side is gone
            host_gone = True
        finally:
            # Let go of the output before saying it ended: whoever hears OUTPUT_END may
            # count on it being closed here.
            stream.forget(wake.set)
            stream.release()
        try:
            if not host_gone:
                self._frames.send(Kind.OUTPUT_END, bytes([output]))
        except OSError:
            host_gone = True
        finally:
            if host_gone:
                self._end_host()
            wake.close()
            self._part_done()

    def _wait_exit(self) -> None:
        # No timeout: if the host goes, the process is killed, and this wait ends with it.
        code = self._service.exit_code(self._process, None)
        if code is None or self._host_gone.is_set():
            return
        try:
            self._frames.send(Kind.EXIT, pack_exit(code))
            self._exit_sent.set()
        except OSError:
            return
        self._part_done()

    def _part_done(self) -> None:
        with self._parts_lock:
            self._parts_left -= 1
            if self._parts_left:
                return
        # Everything said: the host reads to the end, then so does our reader.
        try:
            self._frames.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

