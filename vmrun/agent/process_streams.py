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
# Output pumps and the exit waiter wake this often to notice a host that went away.
_WAKE_SLICE = 0.5
_MAX_SIGNAL = 64


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

    def run(self) -> None:
        outputs: list[tuple[Output, SharedFd]] = []
        for output, stream in ((Output.STDOUT, self._process.stdout),
                               (Output.STDERR, None if self._process.terminal else self._process.stderr)):
            if stream is not None and stream.acquire():
                outputs.append((output, stream))
        self._parts_left += len(outputs)
        try:
            self._frames.send(Kind.ATTACHED)
        except OSError:
            for _, stream in outputs:
                stream.release()
            raise
        for output, stream in outputs:
            threading.Thread(target=self._pump_output, args=(output, stream), name="stream-output",
                             daemon=True).start()
        threading.Thread(target=self._wait_exit, name="stream-exit", daemon=True).start()
        threading.Thread(target=self._write_stdin, name="stream-stdin", daemon=True).start()
        try:
            self._read_host()
        finally:
            self._host_gone.set()
            self._stdin.put(None)
            if not self._exit_sent.is_set():
                self._service.kill(self._process, SIGKILL)

    # ---- from the host ----

    def _read_host(self) -> None:
        while (frame := self._frames.receive()) is not None:
            kind, payload = frame
            if kind == Kind.STDIN:
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
        poller = select.poll()
        poller.register(stream.fd, select.POLLIN)
        kind = OUTPUT_KINDS[output]
        try:
            while not stream.closed and not self._host_gone.is_set():
                if not poller.poll(int(_WAKE_SLICE * 1000)):
                    continue
                try:
                    data = os.read(stream.fd, MAX_FRAME)
                except BlockingIOError:  # a non-blocking fd (crun's pty master may be one)
                    continue
                except OSError:  # EIO: a pty whose other side closed; anything else ends it too
                    break
                if not data:
                    break
                self._frames.send(kind, data)
            self._frames.send(Kind.OUTPUT_END, bytes([output]))
        except OSError:  # the host's side is gone
            self._host_gone.set()
        finally:
            stream.release()
            self._part_done()

    def _wait_exit(self) -> None:
        while (code := self._service.exit_code(self._process, _WAKE_SLICE)) is None:
            if self._host_gone.is_set():
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

