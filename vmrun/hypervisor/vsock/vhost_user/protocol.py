"""vhost-user message framing: what QEMU (the front-end) and this backend say on the socket.

Every message is a 12-byte header (request u32, flags u32, payload size u32, native
endianness, which is little-endian on every host we run on) followed by `size` bytes of
payload. File descriptors (guest memory, eventfds) travel as SCM_RIGHTS ancillary data
attached to the message.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

_HEADER = struct.Struct("<III")
HEADER_SIZE = _HEADER.size

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# QEMU never sends more than 8 fds (one per memory region) with one message.
MAX_FDS = 8
# The largest payload we accept: far above the biggest real one (a 264-byte memory
# table, a 12+256-byte config access), so a corrupt size cannot make us allocate much.
MAX_PAYLOAD = 4096

# Virtio / vhost-user feature bits (GET_FEATURES / SET_FEATURES).
VIRTIO_F_VERSION_1 = 32
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES).
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9

# The payload of SET_VRING_KICK/CALL/ERR: bits 0-7 the queue, bit 8 "no fd sent".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

MAX_CONFIG_SIZE = 256


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"REQUEST_{code}"


class ProtocolError(Exception):
    """The front-end sent something we cannot make sense of; the session ends."""


class Disconnected(Exception):
    """The front-end closed the socket."""


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fd(self) -> int | None:
        """Hand the (single) fd of this message over to the caller, closing any extra."""
        if not self.fds:
            return None
        fd, rest = self.fds[0], self.fds[1:]
        self.fds = rest
        self.close_fds()
        return fd

    # payload accessors
    def u64(self) -> int:
        if len(self.payload) < 8:
            raise ProtocolError(f"{request_name(self.request)}: payload too short for u64")
        value: int = struct.unpack_from("<Q", self.payload)[0]
        return value

    def vring_state(self) -> tuple[int, int]:
        if len(self.payload) < 8:
            raise ProtocolError(f"{request_name(self.request)}: payload too short for vring state")
        index, num = struct.unpack_from("<II", self.payload)
        return index, num


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return _HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, VERSION | FLAG_REPLY)


def u64_payload(value: int) -> bytes:
    return struct.pack("<Q", value)


def vring_state_payload(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def decode_header(data: bytes) -> tuple[int, int, int]:
    request, flags, size = _HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{request_name(request)}: payload of {size} bytes is too large")
    return request, flags, size


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise Disconnected("front-end closed the connection mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def recv_message(sock: socket.socket) -> Message:
    """Read one whole message (blocking: QEMU writes each message in one go)."""
    data, ancdata, msg_flags, _ = sock.recvmsg(
        HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    )
    fds = _fds_from_ancillary(ancdata)
    try:
        if not data:
            raise Disconnected("front-end closed the connection")
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors attached to one message")
        if len(data) < HEADER_SIZE:
            data += _recv_exact(sock, HEADER_SIZE - len(data))
        request, flags, size = decode_header(data)
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


# --- structured payloads -----------------------------------------------------------------

_MEM_HEADER = struct.Struct("<II")  # nregions u32, padding u32
_MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags


@dataclass(frozen=True)
class MemRegionDesc:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def parse_mem_table(payload: bytes) -> list[MemRegionDesc]:
    if len(payload) < _MEM_HEADER.size:
        raise ProtocolError("SET_MEM_TABLE: payload too short")
    nregions, _ = _MEM_HEADER.unpack_from(payload)
    if nregions > MAX_FDS:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions (at most {MAX_FDS})")
    need = _MEM_HEADER.size + nregions * _MEM_REGION.size
    if len(payload) < need:
        raise ProtocolError("SET_MEM_TABLE: payload shorter than its region count")
    return [
        MemRegionDesc(*_MEM_REGION.unpack_from(payload, _MEM_HEADER.size + i * _MEM_REGION.size))
        for i in range(nregions)
    ]


def encode_mem_table(regions: list[MemRegionDesc]) -> bytes:
    out = _MEM_HEADER.pack(len(regions), 0)
    for r in regions:
        out += _MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


def parse_vring_addr(payload: bytes) -> VringAddr:
    if len(payload) < _VRING_ADDR.size:
        raise ProtocolError("SET_VRING_ADDR: payload too short")
    return VringAddr(*_VRING_ADDR.unpack_from(payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _VRING_ADDR.pack(
        addr.index, addr.flags, addr.desc_user_addr, addr.used_user_addr,
        addr.avail_user_addr, addr.log_guest_addr,
    )


@dataclass(frozen=True)
class ConfigAccess:
    offset: int
    size: int
    flags: int
    data: bytes


def parse_config(payload: bytes) -> ConfigAccess:
    if len(payload) < _CONFIG_HEADER.size:
        raise ProtocolError("config access: payload too short")
    offset, size, flags = _CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config access of {size} bytes (at most {MAX_CONFIG_SIZE})")
    return ConfigAccess(offset, size, flags, payload[_CONFIG_HEADER.size:])


def encode_config(offset: int, size: int, flags: int, data: bytes) -> bytes:
    return _CONFIG_HEADER.pack(offset, size, flags) + data


def read_config(space: bytes, access: ConfigAccess) -> bytes:
    """The GET_CONFIG reply payload: the same header, then `size` bytes of config space.

    QEMU insists that the reply has exactly the size it asked for, so bytes past the end
    of our (8-byte) config space read as zero instead of failing the access.
    """
    chunk = space[access.offset: access.offset + access.size]
    chunk += bytes(access.size - len(chunk))
    return encode_config(access.offset, access.size, access.flags, chunk)
