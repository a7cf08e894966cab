"""ttrpc: the small RPC protocol containerd speaks with its shims, over a unix socket.

This follows github.com/containerd/ttrpc (the unary protocol; no streams). Each message is
one frame: a 10-byte big-endian header and one protobuf.

    length     u32  bytes of protobuf after the header (the header not counted); at most 4 MiB
    stream id  u32  which call the frame belongs to; the client numbers its calls 1, 3, 5, ...
    type       u8   1 request, 2 response
    flags      u8   reserved: sent as 0, ignored when read

A request frame carries a ttrpc.Request (service, method and the serialized request
message as payload); the answer is one response frame on the same stream id carrying a
ttrpc.Response (the serialized reply, or a google.rpc.Status-shaped status with a gRPC code;
success leaves the status unset). Calls are multiplexed: many may be outstanding on one
connection and their answers come back in any order. containerd depends on that: it keeps
a `Wait` call open for a task's whole life while making other calls on the same connection,
so the server runs every request in a thread of its own.

A frame longer than 4 MiB is read and thrown away (never buffered) and its stream answered
with RESOURCE_EXHAUSTED, as the Go implementation does; the connection lives on.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from google.protobuf.message import DecodeError

from vmrun.errors import VmrunError
from vmrun.shimv2 import ttrpc_pb2

log = logging.getLogger("vmrun.ttrpc")

# gRPC status codes (google.golang.org/grpc/codes), which ttrpc reuses.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

_HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = _HEADER.size  # 10
MAX_MESSAGE_LENGTH = 4 << 20  # of the protobuf after the header, as ttrpc's messageLengthMax
MESSAGE_TYPE_REQUEST = 1
MESSAGE_TYPE_RESPONSE = 2
MAX_IN_FLIGHT = 128  # requests per server connection running at once
_MAX_STREAM_ID = 0xFFFFFFFF
_DISCARD_CHUNK = 64 << 10
_JOIN_TIMEOUT = 2.0  # for our own threads, which exit as soon as their socket is shut down

Handler = Callable[[bytes], bytes]
"""Takes the request's serialized protobuf, returns the reply's; raises TtrpcError to fail."""


class TtrpcError(VmrunError):
    """A call failed with a gRPC status code: raised by handlers, and by the client."""

    def __init__(self, code: int, message: str):
        super().__init__(f"ttrpc: {message} (code {code})")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FrameHeader:
    length: int
    stream_id: int
    type: int
    flags: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(self.length, self.stream_id, self.type, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> FrameHeader:
        return cls(*_HEADER.unpack(data))


def encode_frame(stream_id: int, message_type: int, payload: bytes) -> bytes:
    """One frame: header and payload in a single buffer, so one sendall writes it whole."""
    return FrameHeader(len(payload), stream_id, message_type).pack() + payload


def _response_message(payload: bytes = b"", code: int = OK, message: str = "") -> bytes:
    response = ttrpc_pb2.Response(payload=payload)
    if code != OK:  # Go's server leaves the status out on success; do the same
        response.status.code = code
        response.status.message = message
    return response.SerializeToString()


def _error_frame(stream_id: int, code: int, message: str) -> bytes:
    return encode_frame(stream_id, MESSAGE_TYPE_RESPONSE, _response_message(code=code, message=message))


class _PeerGone(Exception):
    """The connection ended (EOF, or shut down), possibly in the middle of a frame."""


class _Malformed(Exception):
    """The peer sent something that is not ttrpc; the connection cannot be trusted further."""


class _FrameReader:
    """Reads whole frames off a blocking stream socket."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def read(self) -> tuple[FrameHeader, bytes | None]:
        """The next frame's header and payload; None as payload when the frame was longer
        than MAX_MESSAGE_LENGTH (its bytes were read and dropped, never buffered)."""
        header = FrameHeader.unpack(self._read_exactly(HEADER_LENGTH))
        if header.length > MAX_MESSAGE_LENGTH:
            self._discard(header.length)
            return header, None
        return header, self._read_exactly(header.length)

    def _read_exactly(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            count = self._sock.recv_into(view[done:])
            if count == 0:
                raise _PeerGone("end of stream" if done == 0 else f"end of stream after {done} of {size} bytes")
            done += count
        return bytes(buffer)

    def _discard(self, size: int) -> None:
        left = size
        while left:
            chunk = self._sock.recv(min(left, _DISCARD_CHUNK))
            if not chunk:
                raise _PeerGone(f"end of stream inside an oversized frame of {size} bytes")
            left -= len(chunk)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, VmrunError):  # our own errors are worded for the caller already
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ServerConnection:
    """One accepted connection: a reader thread, and a lock that keeps response frames whole."""

    def __init__(self, server: TtrpcServer, sock: socket.socket, number: int, max_in_flight: int):
        self.number = number
        self._server = server
        self._sock = sock
        self._max_in_flight = max_in_flight
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()  # taken after _write_lock, never before
        self._in_flight = 0
        self._closed = False
        self.reader = threading.Thread(target=self._read_loop, name=f"ttrpc-conn-{number}", daemon=True)

    def send(self, frame: bytes) -> None:
        with self._write_lock:
            if self._closed:
                raise BrokenPipeError("connection closed")
            self._sock.sendall(frame)

    def shutdown(self) -> None:
        """Wakes the reader (recv returns end of stream) and any writer blocked on a full socket."""
        with self._state_lock:
            if not self._closed:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.shutdown()
        # Closed under the write lock, so no handler can be writing to a recycled fd number.
        with self._write_lock, self._state_lock:
            if not self._closed:
                self._closed = True
                self._sock.close()

    def release_slot(self) -> None:
        with self._state_lock:
            self._in_flight -= 1

    def _reserve_slot(self) -> bool:
        with self._state_lock:
            if self._in_flight >= self._max_in_flight:
                return False
            self._in_flight += 1
            return True

    def _read_loop(self) -> None:
        reader = _FrameReader(self._sock)
        try:
            while True:
                header, data = reader.read()
                self._on_frame(header, data)
        except _PeerGone as exc:
            log.debug("ttrpc: connection %d ended: %s", self.number, exc)
        except _Malformed as exc:
            log.warning("ttrpc: closing connection %d: %s", self.number, exc)
        except OSError as exc:  # reset by the peer, or shut down by close()
            log.debug("ttrpc: connection %d failed: %s", self.number, exc)
        finally:
            self.close()
            self._server._forget(self)

    def _on_frame(self, header: FrameHeader, data: bytes | None) -> None:
        stream_id = header.stream_id
        if data is None:
            self.send(_error_frame(
                stream_id, RESOURCE_EXHAUSTED,
                f"message length {header.length} exceeds maximum message size of {MAX_MESSAGE_LENGTH}"))
            return
        if header.type != MESSAGE_TYPE_REQUEST:
            # Go's server skips unknown types "for future compat"; so do we.
            log.debug("ttrpc: connection %d: ignoring frame of type %d", self.number, header.type)
            return
        if stream_id % 2 != 1:
            self.send(_error_frame(stream_id, INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"))
            return
        try:
            request = ttrpc_pb2.Request.FromString(data)
        except DecodeError as exc:
            raise _Malformed(f"undecodable request on stream {stream_id}: {exc}") from exc
        if not self._reserve_slot():
            # Refused rather than queued: a thread per request must stay bounded.
            self.send(_error_frame(stream_id, RESOURCE_EXHAUSTED,
                                   f"more than {self._max_in_flight} requests in flight on this connection"))
            return
        if not self._server._dispatch(self, stream_id, request):
            self.release_slot()
            self.send(_error_frame(stream_id, RESOURCE_EXHAUSTED, "cannot start a thread for the request"))


class TtrpcServer:
    """Serves `services` ({service name: {method name: handler}}) on a listening AF_UNIX socket.

    The server owns the listener from start() on and closes it in close() (the socket file
    is left for the caller to remove). A request's timeout_nano is not enforced: a handler is
    a plain function with nothing to cancel; the client gives up on its own."""

    def __init__(
        self,
        listener: socket.socket,
        services: dict[str, dict[str, Handler]],
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
    ):
        self._listener = listener
        self._services = {name: dict(methods) for name, methods in services.items()}
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._connections: set[_ServerConnection] = set()
        self._handlers: set[threading.Thread] = set()
        self._numbers = itertools.count(1)
        self._closed = False
        # accept() is not woken by closing the listener in another thread: poll a pipe too.
        self._wake_read, self._wake_write = os.pipe()
        self._accept_thread: threading.Thread | None = None

    def start(self) -> TtrpcServer:
        with self._lock:
            if self._closed or self._accept_thread is not None:
                raise RuntimeError("ttrpc server already started or closed")
            self._listener.setblocking(False)  # poll says when; a vanished connection must not block us
            self._accept_thread = threading.Thread(target=self._accept_loop, name="ttrpc-accept", daemon=True)
            self._accept_thread.start()
        return self

    def close(self, grace: float = 2.0) -> None:
        """Stops accepting, closes every connection, and waits (up to `grace` seconds) for
        handlers still running: a handler cannot be interrupted, only waited for."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            accept_thread = self._accept_thread
        os.write(self._wake_write, b"x")
        if accept_thread is not None:
            accept_thread.join(_JOIN_TIMEOUT)
        self._listener.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        for connection in connections:
            connection.reader.join(_JOIN_TIMEOUT)
            connection.close()
        deadline = time.monotonic() + grace
        with self._lock:  # a handler may itself call close() (a Shutdown method): it cannot wait for itself
            handlers = [thread for thread in self._handlers if thread is not threading.current_thread()]
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = [thread.name for thread in handlers if thread.is_alive()]
        if running:
            log.warning("ttrpc: %d handlers still running after close: %s", len(running), ", ".join(running))

    def __enter__(self) -> TtrpcServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            events = poller.poll()
            if self._closed or any(fd == self._wake_read for fd, _ in events):
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the connection went away between poll and accept
            except OSError as exc:
                log.error("ttrpc: accept failed: %s", exc)
                time.sleep(0.1)  # e.g. out of fds: the listener stays readable, don't spin
                continue
            sock.setblocking(True)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                connection = _ServerConnection(self, sock, next(self._numbers), self._max_in_flight)
                self._connections.add(connection)
                connection.reader.start()  # under the lock, so close() never joins an unstarted thread

    def _forget(self, connection: _ServerConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _dispatch(self, connection: _ServerConnection, stream_id: int, request: ttrpc_pb2.Request) -> bool:
        thread = threading.Thread(
            target=self._handle, args=(connection, stream_id, request),
            name=f"ttrpc-handler-{connection.number}-{stream_id}", daemon=True)
        with self._lock:
            self._handlers.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._handlers.discard(thread)
            return False
        return True

    def _handle(self, connection: _ServerConnection, stream_id: int, request: ttrpc_pb2.Request) -> None:
        try:
            connection.send(encode_frame(stream_id, MESSAGE_TYPE_RESPONSE, self._call(request)))
        except OSError as exc:  # the client left before its answer
            log.debug("ttrpc: cannot answer %s/%s: %s", request.service, request.method, exc)
        finally:
            connection.release_slot()
            with self._lock:
                self._handlers.discard(threading.current_thread())

    def _call(self, request: ttrpc_pb2.Request) -> bytes:
        """The serialized Response for `request`."""
        name = f"{request.service}/{request.method}"
        handler = self._services.get(request.service, {}).get(request.method)
        if handler is None:
            return _response_message(code=UNIMPLEMENTED, message=f"{name} is not implemented")
        try:
            result = handler(request.payload)
        except TtrpcError as exc:
            log.debug("ttrpc: %s failed: %s", name, exc)
            return _response_message(code=exc.code, message=exc.message)
        except Exception as exc:  # noqa: BLE001 - any failure must still answer the caller
            log.error("ttrpc: %s failed", name, exc_info=True)
            return _response_message(code=INTERNAL, message=_one_line(exc))
        if not isinstance(result, (bytes, bytearray)):
            log.error("ttrpc: %s returned %s, not bytes", name, type(result).__name__)
            return _response_message(code=INTERNAL, message=f"{name} returned {type(result).__name__}, not bytes")
        message = _response_message(payload=bytes(result))
        if len(message) > MAX_MESSAGE_LENGTH:  # the client would drop it anyway
            return _response_message(
                code=RESOURCE_EXHAUSTED,
                message=f"{name}: response of {len(message)} bytes exceeds maximum message size of "
                        f"{MAX_MESSAGE_LENGTH}")
        return message


@dataclass
class _PendingCall:
    done: threading.Event = field(default_factory=threading.Event)
    response: ttrpc_pb2.Response | None = None
    error: TtrpcError | None = None


class TtrpcClient:
    """A connection to a ttrpc server on a unix socket; `call` may be used from many threads
    at once, the calls sharing the connection. `timeout` bounds connecting only."""

    def __init__(self, path: str, timeout: float = 10.0):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise TtrpcError(UNAVAILABLE, f"cannot connect to {path}: {exc}") from exc
        self._sock = sock
        self._lock = threading.Lock()  # pending calls, stream ids, closed state; after _write_lock
        self._write_lock = threading.Lock()  # keeps request frames whole
        self._pending: dict[int, _PendingCall] = {}
        self._next_stream_id = 1
        self._closed_reason: str | None = None
        self._sock_closed = False
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client-reader", daemon=True)
        self._reader.start()

    def call(self, service: str, method: str, payload: bytes, timeout: float | None = None) -> bytes:
        """Calls service/method with a serialized request; returns the serialized reply.
        Without `timeout` it waits as long as the server takes (as containerd's Wait does)."""
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1e9))  # 0 would mean "no deadline"
        message = request.SerializeToString()
        if len(message) > MAX_MESSAGE_LENGTH:
            raise TtrpcError(RESOURCE_EXHAUSTED, f"request of {len(message)} bytes exceeds maximum message size "
                                                 f"of {MAX_MESSAGE_LENGTH}")
        pending = _PendingCall()
        with self._lock:
            if self._closed_reason is not None:
                raise TtrpcError(UNAVAILABLE, self._closed_reason)
            stream_id = self._next_stream_id
            # Odd ids only; after 2**31 calls, start over (those ids are long answered).
            self._next_stream_id = stream_id + 2 if stream_id + 2 <= _MAX_STREAM_ID else 1
            self._pending[stream_id] = pending
        try:
            with self._write_lock:
                self._sock.sendall(encode_frame(stream_id, MESSAGE_TYPE_REQUEST, message))
        except OSError as exc:
            # A half-written frame leaves the stream unusable: give the connection up.
            self._shut(f"connection lost: {exc}")
            raise TtrpcError(UNAVAILABLE, f"connection lost: {exc}") from exc
        if not pending.done.wait(timeout):
            with self._lock:
                ours = self._pending.pop(stream_id, None) is not None
            if ours:  # a late answer will find no caller and be dropped
                raise TtrpcError(DEADLINE_EXCEEDED, f"{service}/{method}: no answer within {timeout}s")
            pending.done.wait()  # the reader took the answer just now: it is moments away
        if pending.error is not None:
            raise pending.error
        response = pending.response
        assert response is not None
        if response.HasField("status") and response.status.code != OK:
            raise TtrpcError(response.status.code, response.status.message)
        return response.payload

    def close(self) -> None:
        """Closes the connection; calls still waiting fail with UNAVAILABLE. Idempotent."""
        self._shut("client closed")
        if self._reader is not threading.current_thread():
            self._reader.join(_JOIN_TIMEOUT)
        with self._write_lock, self._lock:
            if not self._sock_closed:
                self._sock_closed = True
                self._sock.close()

    def __enter__(self) -> TtrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _shut(self, reason: str) -> None:
        """Marks the connection dead, wakes the reader and fails every waiting call."""
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            reason = self._closed_reason
            pending = list(self._pending.values())
            self._pending.clear()
            if not self._sock_closed:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for call in pending:
            call.error = TtrpcError(UNAVAILABLE, reason)
            call.done.set()

    def _read_loop(self) -> None:
        reader = _FrameReader(self._sock)
        reason = "connection closed by the server"
        try:
            while True:
                header, data = reader.read()
                if header.type != MESSAGE_TYPE_RESPONSE:
                    log.debug("ttrpc: ignoring frame of type %d from the server", header.type)
                    continue
                with self._lock:
                    pending = self._pending.pop(header.stream_id, None)
                if pending is None:  # e.g. the answer to a call that timed out
                    log.debug("ttrpc: answer for stream %d, which no call awaits", header.stream_id)
                    continue
                if data is None:
                    pending.error = TtrpcError(RESOURCE_EXHAUSTED, f"response of {header.length} bytes exceeds "
                                                                   f"maximum message size of {MAX_MESSAGE_LENGTH}")
                else:
                    try:
                        pending.response = ttrpc_pb2.Response.FromString(data)
                    except DecodeError as exc:
                        pending.error = TtrpcError(INTERNAL, f"undecodable response: {exc}")
                pending.done.set()
        except _PeerGone as exc:
            log.debug("ttrpc: client connection ended: %s", exc)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._shut(reason)
