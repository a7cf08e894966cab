"""virtio-vsock packets: the 44-byte little-endian header every packet starts with.

The header is the whole of the wire protocol between the guest's virtio-vsock driver and
this backend: addressing (cid, port), the operation, and the credit counters that drive
flow control (buf_alloc / fwd_cnt) ride along in every packet.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# src_cid u64, dst_cid u64, src_port u32, dst_port u32, len u32, type u16, op u16,
# flags u32, buf_alloc u32, fwd_cnt u32 -- packed, little-endian.
_HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 44

HOST_CID = 2
VSOCK_TYPE_STREAM = 1  # SEQPACKET (2) is a feature we do not offer.


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# SHUTDOWN flags: the sender will receive no more (RCV) / send no more (SEND).
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND


class PacketError(ValueError):
    """A packet that cannot be decoded."""


@dataclass(slots=True)
class VsockHeader:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int = 0
    type: int = VSOCK_TYPE_STREAM
    op: int = Op.INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _HEADER.pack_into(
            buf, offset, self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "VsockHeader":
        if len(data) < HEADER_SIZE:
            raise PacketError(f"vsock header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*_HEADER.unpack_from(data, 0))

    def reply(self, op: int, **fields: int) -> "VsockHeader":
        """A header going back the way this one came (addresses swapped)."""
        hdr = VsockHeader(
            src_cid=self.dst_cid, dst_cid=self.src_cid,
            src_port=self.dst_port, dst_port=self.src_port, op=op,
        )
        for name, value in fields.items():
            setattr(hdr, name, value)
        return hdr

    def describe(self) -> str:
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op{self.op}"
        return (
            f"{op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
            f"len={self.len} flags={self.flags} buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}"
        )
