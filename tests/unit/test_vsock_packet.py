"""virtio-vsock header encoding."""

import struct

import pytest

from vmrun.hypervisor.vsock.vhost_user.packet import (
    HEADER_SIZE, HOST_CID, Op, PacketError, VSOCK_TYPE_STREAM, VsockHeader,
)


def test_header_is_44_bytes_little_endian_in_spec_order():
    hdr = VsockHeader(src_cid=3, dst_cid=2, src_port=0x11223344, dst_port=5000, len=7,
                      type=VSOCK_TYPE_STREAM, op=Op.RW, flags=2, buf_alloc=262144,
                      fwd_cnt=0xDEADBEEF)
    raw = hdr.pack()
    assert HEADER_SIZE == 44 and len(raw) == 44
    assert raw[0:8] == (3).to_bytes(8, "little")
    assert raw[8:16] == (2).to_bytes(8, "little")
    assert raw[16:20] == bytes([0x44, 0x33, 0x22, 0x11])
    assert struct.unpack_from("<I", raw, 20)[0] == 5000
    assert struct.unpack_from("<I", raw, 24)[0] == 7
    assert struct.unpack_from("<HH", raw, 28) == (1, 5)
    assert struct.unpack_from("<III", raw, 32) == (2, 262144, 0xDEADBEEF)


def test_unpack_round_trip_and_pack_into():
    hdr = VsockHeader(src_cid=42, dst_cid=HOST_CID, src_port=1, dst_port=2, len=3,
                      op=Op.SHUTDOWN, flags=3, buf_alloc=4, fwd_cnt=5)
    assert VsockHeader.unpack(hdr.pack()) == hdr
    buf = bytearray(50)
    hdr.pack_into(buf, 6)
    assert VsockHeader.unpack(memoryview(buf)[6:]) == hdr


def test_unpack_rejects_short_input():
    with pytest.raises(PacketError):
        VsockHeader.unpack(b"\0" * 43)


def test_reply_swaps_addresses():
    hdr = VsockHeader(src_cid=42, dst_cid=2, src_port=1234, dst_port=80, op=Op.REQUEST,
                      buf_alloc=9, fwd_cnt=9)
    rst = hdr.reply(Op.RST)
    assert (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port) == (2, 80, 42, 1234)
    assert rst.op == Op.RST and rst.len == 0 and rst.buf_alloc == 0
    assert "RST 2:80->42:1234" in rst.describe()
