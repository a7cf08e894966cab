"""vhost-user message framing and payloads."""

import os
import socket
import struct

import pytest

from vmrun.hypervisor.vsock.vhost_user import protocol as proto
from vmrun.hypervisor.vsock.vhost_user.protocol import (
    ConfigAccess, Disconnected, MemRegionDesc, ProtocolError, Request, VringAddr,
)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_encode_header_layout():
    raw = proto.encode(Request.SET_FEATURES, proto.u64_payload(0x140000000))
    assert struct.unpack_from("<III", raw) == (2, 1, 8)
    assert raw[12:] == (0x140000000).to_bytes(8, "little")
    reply = proto.encode_reply(Request.GET_FEATURES, b"x" * 8)
    assert struct.unpack_from("<III", reply) == (1, 0x5, 8)


def test_recv_message_with_payload(pair):
    a, b = pair
    a.sendall(proto.encode(Request.SET_VRING_NUM, proto.vring_state_payload(1, 128)))
    msg = proto.recv_message(b)
    assert msg.request == Request.SET_VRING_NUM
    assert msg.vring_state() == (1, 128)
    assert msg.fds == [] and not msg.need_reply


def test_recv_message_carries_fds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        socket.send_fds(a, [proto.encode(Request.SET_VRING_KICK, proto.u64_payload(1))], [w])
        msg = proto.recv_message(b)
        assert msg.u64() == 1 and len(msg.fds) == 1
        fd = msg.take_fd()
        assert msg.fds == []
        os.write(fd, b"k")  # the received fd is the pipe's write end
        os.close(fd)
        assert os.read(r, 1) == b"k"
    finally:
        os.close(r)
        os.close(w)


def test_take_fd_closes_extra_fds(pair):
    a, b = pair
    pipes = [os.pipe() for _ in range(2)]
    try:
        socket.send_fds(a, [proto.encode(Request.SET_VRING_CALL, proto.u64_payload(0))],
                        [w for _, w in pipes])
        msg = proto.recv_message(b)
        assert len(msg.fds) == 2
        fd = msg.take_fd()
        os.close(fd)
        # Both pipes' last write ends are now ours; closing them must give EOF, which
        # only happens if take_fd() closed the extra received fd (else: EAGAIN).
        for r, w in pipes:
            os.close(w)
            os.set_blocking(r, False)
            assert os.read(r, 1) == b""
    finally:
        for r, _ in pipes:
            os.close(r)


def test_header_and_payload_arriving_in_pieces(pair):
    a, b = pair
    raw = proto.encode(Request.GET_CONFIG, proto.encode_config(0, 8, 0, bytes(8)))
    a.sendall(raw[:5])
    a.sendall(raw[5:15])
    a.sendall(raw[15:])
    msg = proto.recv_message(b)
    assert msg.request == Request.GET_CONFIG
    assert proto.parse_config(msg.payload) == ConfigAccess(0, 8, 0, bytes(8))


def test_disconnect_is_reported(pair):
    a, b = pair
    a.close()
    with pytest.raises(Disconnected):
        proto.recv_message(b)


def test_truncated_message_is_a_disconnect(pair):
    a, b = pair
    a.sendall(proto.encode(Request.SET_FEATURES, proto.u64_payload(1))[:16])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(Disconnected):
        proto.recv_message(b)


def test_bad_version_and_oversized_payload_are_rejected(pair):
    a, b = pair
    a.sendall(struct.pack("<III", 1, 0x2, 0))
    with pytest.raises(ProtocolError, match="version"):
        proto.recv_message(b)
    a.sendall(struct.pack("<III", 1, 0x1, 1 << 20))
    with pytest.raises(ProtocolError, match="too large"):
        proto.recv_message(b)


def test_short_u64_payload_is_an_error():
    with pytest.raises(ProtocolError):
        proto.Message(Request.SET_FEATURES, payload=b"\0" * 4).u64()


def test_mem_table_round_trip_and_limits():
    regions = [MemRegionDesc(0, 0x8000_0000, 0x7F00_0000_0000, 0),
               MemRegionDesc(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x8000_0000)]
    payload = proto.encode_mem_table(regions)
    assert len(payload) == 8 + 2 * 32
    assert proto.parse_mem_table(payload) == regions
    with pytest.raises(ProtocolError):
        proto.parse_mem_table(payload[:-1])
    with pytest.raises(ProtocolError):
        proto.parse_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))


def test_vring_addr_field_order():
    # desc, used, avail, log: the wire order is not the ring order
    payload = struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0)
    addr = proto.parse_vring_addr(payload)
    assert addr == VringAddr(1, 0, desc_user_addr=0x1000, used_user_addr=0x2000,
                             avail_user_addr=0x3000, log_guest_addr=0)
    assert proto.encode_vring_addr(addr) == payload
    with pytest.raises(ProtocolError):
        proto.parse_vring_addr(payload[:20])


def test_read_config_returns_cid_and_pads_beyond_the_space():
    space = struct.pack("<Q", 42)
    reply = proto.read_config(space, proto.parse_config(proto.encode_config(0, 8, 0, bytes(8))))
    assert reply == struct.pack("<III", 0, 8, 0) + (42).to_bytes(8, "little")
    reply = proto.read_config(space, ConfigAccess(4, 8, 0, b""))
    assert reply[12:] == bytes(8)  # cid 42 has no high bytes; then past the end: zeros
    reply = proto.read_config(space, ConfigAccess(0, 4, 0, b""))
    assert reply[12:] == (42).to_bytes(4, "little")
    with pytest.raises(ProtocolError):
        proto.parse_config(struct.pack("<III", 0, 257, 0))


def test_request_names():
    assert proto.request_name(24) == "GET_CONFIG"
    assert proto.request_name(99) == "REQUEST_99"
