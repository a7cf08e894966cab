"""Connection state and credit-based flow control (no I/O)."""

import pytest

from vmrun.hypervisor.vsock.vhost_user.backend import _parse_connect
from vmrun.hypervisor.vsock.vhost_user.connections import (
    Connection, ConnectionTable, State, rst_for,
)
from vmrun.hypervisor.vsock.vhost_user.packet import (
    HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, Op, VsockHeader,
)

CID = 42


def conn(**kw) -> Connection:
    base = dict(guest_cid=CID, guest_port=1234, host_port=5000, host_initiated=False,
                state=State.ESTABLISHED, buf_alloc=1000)
    base.update(kw)
    return Connection(**base)


def from_guest(c: Connection, op=Op.CREDIT_UPDATE, buf_alloc=0, fwd_cnt=0, flags=0):
    return VsockHeader(src_cid=CID, dst_cid=HOST_CID, src_port=c.guest_port,
                       dst_port=c.host_port, op=op, flags=flags, buf_alloc=buf_alloc,
                       fwd_cnt=fwd_cnt)


def test_header_addresses_and_advertised_credit():
    c = conn()
    c.on_forwarded(300)
    hdr = c.header(Op.RW, 10)
    assert (hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port) == (2, 5000, CID, 1234)
    assert (hdr.len, hdr.buf_alloc, hdr.fwd_cnt) == (10, 1000, 300)
    assert c.advertised_fwd_cnt == 300


def test_peer_credit_follows_the_guest_counters():
    c = conn()
    assert c.peer_credit() == 0  # nothing known yet: send nothing
    c.update_peer_credit(from_guest(c, buf_alloc=4096, fwd_cnt=0))
    assert c.peer_credit() == 4096
    c.on_sent_to_guest(4000)
    assert c.peer_credit() == 96
    c.on_sent_to_guest(96)
    assert c.peer_credit() == 0
    c.update_peer_credit(from_guest(c, buf_alloc=4096, fwd_cnt=1000))
    assert c.peer_credit() == 1000


def test_peer_credit_across_u32_wrap():
    c = conn()
    c.tx_cnt = 0xFFFF_FF00
    c.update_peer_credit(from_guest(c, buf_alloc=4096, fwd_cnt=0xFFFF_FF00))
    c.on_sent_to_guest(0x200)  # tx_cnt wraps to 0x100
    assert c.tx_cnt == 0x100
    assert c.peer_credit() == 4096 - 0x200


def test_peer_shrinking_its_buffer_never_gives_negative_credit():
    c = conn()
    c.update_peer_credit(from_guest(c, buf_alloc=4096))
    c.on_sent_to_guest(3000)
    c.update_peer_credit(from_guest(c, buf_alloc=1024))
    assert c.peer_credit() == 0


def test_guest_overrunning_our_credit_is_detected():
    c = conn(buf_alloc=1000)
    assert c.on_guest_data(600)
    c.on_forwarded(100)
    assert c.on_guest_data(500)  # 1000 buffered: exactly the window
    assert c.buffered_from_guest() == 1000
    assert not c.on_guest_data(1)


def test_fwd_cnt_only_counts_what_the_host_took():
    c = conn(buf_alloc=1000)
    c.on_guest_data(800)
    c.on_forwarded(100)  # host socket took 100 of 800
    assert c.fwd_cnt == 100 and c.buffered_from_guest() == 700
    assert c.header(Op.RW).fwd_cnt == 100


def test_credit_update_after_a_quarter_of_the_window():
    c = conn(buf_alloc=1000)
    c.on_guest_data(1000)
    c.on_forwarded(249)
    assert not c.credit_update_due()
    c.on_forwarded(1)
    assert c.credit_update_due()
    c.header(Op.CREDIT_UPDATE)  # sending any packet announces fwd_cnt
    assert not c.credit_update_due()
    c.on_forwarded(250)
    assert c.credit_update_due()


def test_no_credit_update_when_the_guest_sends_no_more_or_not_established():
    c = conn(buf_alloc=1000)
    c.on_guest_data(1000)
    c.on_forwarded(1000)
    c.on_peer_shutdown(SHUTDOWN_SEND)
    assert not c.credit_update_due()
    c2 = conn(state=State.CONNECTING)
    c2.on_forwarded(1000)
    assert not c2.credit_update_due()


def test_wants_host_read_needs_credit_and_an_empty_stage():
    c = conn()
    assert not c.wants_host_read()  # no credit yet
    c.update_peer_credit(from_guest(c, buf_alloc=100))
    assert c.wants_host_read()
    c.to_guest = b"x"
    assert not c.wants_host_read()
    c.to_guest = b""
    c.host_eof = True
    assert not c.wants_host_read()
    assert not conn(state=State.CONNECTING).wants_host_read()


def test_host_eof_sends_shutdown_send_after_staged_data():
    c = conn()
    c.host_eof = True
    c.to_guest = memoryview(b"tail")
    assert not c.shutdown_due()  # the last bytes go first
    c.to_guest = b""
    assert c.shutdown_due()
    c.shutdown_sent = True
    assert not c.shutdown_due()


def test_guest_shut_send_shuts_host_write_once_flushed():
    c = conn()
    c.to_host += b"pending"
    c.on_peer_shutdown(SHUTDOWN_SEND)
    assert c.peer_shut_send and not c.peer_shut_rcv
    assert not c.host_write_shutdown_due()
    c.to_host.clear()
    assert c.host_write_shutdown_due()
    c.host_write_shut = True
    assert not c.host_write_shutdown_due()


def test_half_close_keeps_the_other_direction_open():
    c = conn()
    c.update_peer_credit(from_guest(c, buf_alloc=100))
    c.on_peer_shutdown(SHUTDOWN_SEND)
    assert not c.guest_side_done()
    assert c.wants_host_read()  # the guest still receives


def test_guest_shut_rcv_stops_host_reads_and_drops_staged():
    c = conn()
    c.update_peer_credit(from_guest(c, buf_alloc=100))
    c.to_guest = b"unwanted"
    c.on_peer_shutdown(SHUTDOWN_RCV)
    assert c.to_guest == b"" and not c.wants_host_read()


def test_both_directions_finished():
    c = conn()
    c.on_peer_shutdown(SHUTDOWN_BOTH)
    assert c.guest_side_done()
    c = conn()
    c.on_peer_shutdown(SHUTDOWN_SEND)
    c.host_eof = True
    assert not c.guest_side_done()  # our SHUTDOWN has not gone out yet
    c.shutdown_sent = True
    assert c.guest_side_done()


def test_closing_connection_drains_before_the_host_socket_closes():
    c = conn(state=State.CLOSING)
    c.to_host += b"abc"
    assert not c.host_side_done()
    c.to_host.clear()
    assert c.host_side_done()


def test_rst_answers_along_the_reverse_path():
    hdr = VsockHeader(src_cid=CID, dst_cid=2, src_port=7, dst_port=9, op=Op.RW, len=5)
    rst = rst_for(hdr)
    assert (rst.op, rst.src_port, rst.dst_port, rst.dst_cid, rst.len) == (Op.RST, 9, 7, CID, 0)


def test_table_lookup_and_port_allocation():
    table = ConnectionTable()
    first = table.allocate_port(80)
    assert first == ConnectionTable.FIRST_EPHEMERAL
    a = conn(host_port=first, guest_port=80)
    table.add(a)
    with pytest.raises(KeyError):
        table.add(conn(host_port=first, guest_port=80))
    table._next_port = first  # force a collision: the allocator skips the used pair
    assert table.allocate_port(80) == first + 1
    assert table.allocate_port(81) == first + 2
    assert table.get(first, 80) is a and table.get(first, 81) is None
    table.remove(a)
    assert len(table) == 0 and table.get(first, 80) is None


@pytest.mark.parametrize("line,port", [
    (b"CONNECT 1024\n", 1024),
    (b"CONNECT 0\n", 0),
    (b"CONNECT 4294967295\n", 4294967295),
    (b"CONNECT 4294967296\n", None),
    (b"CONNECT -1\n", None),
    (b"CONNECT\n", None),
    (b"connect 5\n", None),
    (b"GET / HTTP/1.0\n", None),
])
def test_parse_connect(line, port):
    assert _parse_connect(line) == port
