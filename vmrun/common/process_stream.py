"""The process stream: one guest process's stdio, signals, terminal size and exit status
over one vsock connection to the agent's port PROCESS_STREAM_PORT.

Why not gRPC: the host process standing for a guest process (the shim) would otherwise
load gRPC (~10 MiB per container) and every chunk of output would cross gRPC and two
socket bridges in Python. Here the data moves in frames of up to MAX_FRAME bytes, each a
kind byte and a 4-byte big-endian length, then the payload.

Host -> guest: ATTACH first (JSON: container, exec), then any of STDIN (only within the
credit the guest granted: a process that does not read its stdin blocks neither signals
nor resizes behind it), STDIN_EOF, SIGNAL, RESIZE, CLOSE_OUTPUT (the host's reader of
that stream went away).
Guest -> host: ATTACHED (the outputs are held: nothing the process writes is lost from
now on) or REFUSED (why, then the end), then STDOUT/STDERR data, STDIN_CREDIT, one
OUTPUT_END per output at its end of file, and EXIT (the runc-style status). The guest
closes the connection once it sent EXIT and every OUTPUT_END. If the host's side goes
first, the guest kills the process: nobody stands for it any more.

Both sides treat the other's frames as untrusted: a frame over MAX_FRAME, an unknown
kind or a malformed payload ends the stream.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
import threading

PROCESS_STREAM_PORT = 1026
MAX_FRAME = 256 << 10
# Stdin the host may send ahead of the guest's writes into the process's stdin.
STDIN_WINDOW = 2 << 20
ATTACH_MAX = 4096

_HEADER = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_SIZE = struct.Struct(">HH")


class Kind(enum.IntEnum):
    # host -> guest
    ATTACH = 1
    STDIN = 2
    STDIN_EOF = 3
    SIGNAL = 4
    RESIZE = 5
    CLOSE_OUTPUT = 6
    # guest -> host
    ATTACHED = 16
    REFUSED = 17
    STDOUT = 18
    STDERR = 19
    STDIN_CREDIT = 20
    OUTPUT_END = 21
    EXIT = 22


class Output(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


OUTPUT_KINDS = {Output.STDOUT: Kind.STDOUT, Output.STDERR: Kind.STDERR}


class StreamError(Exception):
    """The other side broke the protocol, or the connection ended mid-frame."""


class FrameSocket:
    """Frames over a connected stream socket: sends from any thread, receives from one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray(_HEADER.size + MAX_FRAME)

    def send(self, kind: Kind, payload: bytes | memoryview = b"") -> None:
        if len(payload) > MAX_FRAME:
            raise ValueError(f"a frame of {len(payload)} bytes is over {MAX_FRAME}")
        with self._send_lock:
            # One call for small frames; the header apart for large ones (no copy of the data).
            if len(payload) <= 4096:
                self.sock.sendall(_HEADER.pack(kind, len(payload)) + bytes(payload))
            else:
                self.sock.sendall(_HEADER.pack(kind, len(payload)))
                self.sock.sendall(payload)

    def receive(self) -> tuple[Kind, memoryview] | None:
        """The next frame (its payload valid until the next call), or None at a clean end."""
        view = memoryview(self._buffer)
        if not self._fill(view[:_HEADER.size], at_start=True):
            return None
        raw_kind, length = _HEADER.unpack_from(view)
        if length > MAX_FRAME:
            raise StreamError(f"a frame of {length} bytes (at most {MAX_FRAME})")
        try:
            kind = Kind(raw_kind)
        except ValueError:
            raise StreamError(f"unknown frame kind {raw_kind}") from None
        payload = view[_HEADER.size:_HEADER.size + length]
        self._fill(payload, at_start=False)
        return kind, payload

    def _fill(self, view: memoryview, at_start: bool) -> bool:
        got = 0
        while got < len(view):
            count = self.sock.recv_into(view[got:])
            if not count:
                if at_start and got == 0:
                    return False
                raise StreamError("the connection ended inside a frame")
            got += count
        return True

    def close(self) -> None:
        self.sock.close()


def attach_payload(container_id: str, exec_id: str) -> bytes:
    return json.dumps({"container": container_id, "exec": exec_id}).encode()


def parse_attach(payload: memoryview) -> tuple[str, str]:
    if len(payload) > ATTACH_MAX:
        raise StreamError("ATTACH is too long")
    try:
        request = json.loads(bytes(payload))
        container_id, exec_id = request["container"], request.get("exec", "")
    except (ValueError, KeyError, TypeError):
        raise StreamError("ATTACH is not {container, exec}") from None
    if not isinstance(container_id, str) or not isinstance(exec_id, str):
        raise StreamError("ATTACH is not {container, exec}")
    return container_id, exec_id


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(payload: memoryview) -> int:
    if len(payload) != _U32.size:
        raise StreamError(f"a {_U32.size}-byte number was expected")
    return _U32.unpack(payload)[0]


def pack_exit(code: int) -> bytes:
    return _I32.pack(code)


def unpack_exit(payload: memoryview) -> int:
    if len(payload) != _I32.size:
        raise StreamError("EXIT carries a 4-byte status")
    return _I32.unpack(payload)[0]


def pack_size(rows: int, columns: int) -> bytes:
    return _SIZE.pack(rows, columns)


def unpack_size(payload: memoryview) -> tuple[int, int]:
    if len(payload) != _SIZE.size:
        raise StreamError("RESIZE carries rows and columns")
    return _SIZE.unpack(payload)


def unpack_output(payload: memoryview) -> Output:
    if len(payload) != 1:
        raise StreamError("an output is named by one byte")
    try:
        return Output(payload[0])
    except ValueError:
        raise StreamError(f"unknown output {payload[0]}") from None
