"""The backend end to end, against a fake QEMU + guest driver written in the test.

The fake speaks vhost-user like QEMU 7.2 does (same message sequence), shares a memfd as
guest RAM, and plays the guest's virtio-vsock driver on the rx/tx split rings in it.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from vmrun.hypervisor.vsock.vhost_user import protocol as proto
from vmrun.hypervisor.vsock.vhost_user.backend import VsockBackend
from vmrun.hypervisor.vsock.vhost_user.packet import (
    HEADER_SIZE, SHUTDOWN_BOTH, SHUTDOWN_SEND, Op, VsockHeader,
)
from vmrun.hypervisor.vsock.vhost_user.protocol import MemRegionDesc, Request, VringAddr
from vmrun.hypervisor.vsock.vhost_user.virtqueue import (
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
)

CID = 42
UVA = 0x7F12_0000_0000  # "QEMU's" mapping of guest RAM; guest-physical base is 0
RAM = 4 * 1024 * 1024
NUM = 64
RX_BUF = 3776  # what Linux 6.1 posts, header included
TX_SLOT = 64 * 1024
WAIT = 5.0


class Ring:
    def __init__(self, fd: int, base: int, num: int) -> None:
        self.fd, self.num = fd, num
        self.desc, self.avail, self.used = base, base + 16 * num, base + 0x1000
        self.avail_idx = 0
        self.seen_used = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        os.pwrite(self.fd, struct.pack("<QIHH", addr, length, flags, nxt), self.desc + 16 * i)

    def offer(self, head: int) -> None:
        os.pwrite(self.fd, struct.pack("<H", head), self.avail + 4 + 2 * (self.avail_idx % self.num))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        os.pwrite(self.fd, struct.pack("<H", self.avail_idx), self.avail + 2)

    def take_used(self) -> list[tuple[int, int]]:
        idx = struct.unpack("<H", os.pread(self.fd, 2, self.used + 2))[0]
        out = []
        while self.seen_used != idx:
            slot = self.seen_used % self.num
            out.append(struct.unpack("<II", os.pread(self.fd, 8, self.used + 4 + 8 * slot)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out


class FakeGuest:
    """QEMU's vhost-user front-end and the guest's virtio-vsock driver."""

    def __init__(self, sock_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sock_path))
        self.sock.settimeout(WAIT)
        self.ram = os.memfd_create("guest-ram")
        os.ftruncate(self.ram, RAM)
        self.rx = Ring(self.ram, 0x1000, NUM)
        self.tx = Ring(self.ram, 0x4000, NUM)
        self.rx_bufs = 0x10000
        self.tx_bufs = self.rx_bufs + NUM * RX_BUF
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.tx_free = list(range(NUM // 2))
        self.inbox: list[tuple[VsockHeader, bytes]] = []

    def close(self) -> None:
        self.sock.close()
        for fd in [self.ram, *self.kick, *self.call]:
            os.close(fd)

    # --- vhost-user ------------------------------------------------------------------------

    def msg(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        proto.send_message(self.sock, proto.encode(request, payload), fds)

    def ask(self, request: int, payload: bytes = b"") -> bytes:
        self.msg(request, payload)
        reply = proto.recv_message(self.sock)
        assert reply.request == request and reply.flags & proto.FLAG_REPLY
        return reply.payload

    def realize(self) -> tuple[int, int, bytes]:
        """QEMU 7.2's realize sequence; returns (features, protocol features, config)."""
        features = struct.unpack("<Q", self.ask(Request.GET_FEATURES))[0]
        pfeatures = struct.unpack("<Q", self.ask(Request.GET_PROTOCOL_FEATURES))[0]
        self.msg(Request.SET_PROTOCOL_FEATURES, proto.u64_payload(0x200))
        self.msg(Request.SET_OWNER)
        self.ask(Request.GET_FEATURES)
        for q in range(2):
            self.msg(Request.SET_VRING_CALL, proto.u64_payload(q), [self.call[q]])
            self.msg(Request.SET_VRING_ERR, proto.u64_payload(q), [self.call[q]])
        config = self.ask(Request.GET_CONFIG, proto.encode_config(0, 8, 0, bytes(8)))
        return features, pfeatures, config

    def start(self, base: tuple[int, int] = (0, 0)) -> None:
        """What QEMU sends when the driver sets DRIVER_OK."""
        for q in range(2):
            self.msg(Request.SET_VRING_CALL, proto.u64_payload(q), [self.call[q]])
        self.msg(Request.SET_FEATURES, proto.u64_payload(0x140000000))
        self.msg(Request.SET_MEM_TABLE,
                 proto.encode_mem_table([MemRegionDesc(0, RAM, UVA, 0)]), [self.ram])
        for q, ring in enumerate((self.rx, self.tx)):
            self.msg(Request.SET_VRING_NUM, proto.vring_state_payload(q, NUM))
            self.msg(Request.SET_VRING_BASE, proto.vring_state_payload(q, base[q]))
            self.msg(Request.SET_VRING_ADDR, proto.encode_vring_addr(
                VringAddr(q, 0, UVA + ring.desc, UVA + ring.used, UVA + ring.avail, 0)))
            self.msg(Request.SET_VRING_KICK, proto.u64_payload(q), [self.kick[q]])
        for q in range(2):
            self.msg(Request.SET_VRING_ENABLE, proto.vring_state_payload(q, 1))
        for q in range(2):
            self.msg(Request.SET_VRING_CALL, proto.u64_payload(q), [self.call[q]])

    def stop(self) -> tuple[int, int]:
        for q in range(2):
            self.msg(Request.SET_VRING_ENABLE, proto.vring_state_payload(q, 0))
        bases = []
        for q in range(2):
            index, base = struct.unpack("<II", self.ask(
                Request.GET_VRING_BASE, proto.vring_state_payload(q, 0)))
            assert index == q
            bases.append(base)
        return bases[0], bases[1]

    # --- the guest driver ------------------------------------------------------------------

    def post_rx(self, count: int = NUM) -> None:
        for i in range(count):
            self.rx.set_desc(i, self.rx_bufs + i * RX_BUF, RX_BUF, VRING_DESC_F_WRITE)
            self.rx.offer(i)
        os.eventfd_write(self.kick[0], 1)

    def send(self, hdr: VsockHeader, payload: bytes = b"") -> None:
        """Queue one tx packet (header and payload in separate descriptors, like Linux)."""
        deadline = time.monotonic() + WAIT
        while not self.tx_free:
            self._reclaim_tx()
            assert time.monotonic() < deadline, "backend does not return tx buffers"
            time.sleep(0.001)
        slot = self.tx_free.pop()
        addr = self.tx_bufs + slot * (HEADER_SIZE + TX_SLOT)
        hdr.len = len(payload)
        os.pwrite(self.ram, hdr.pack() + payload, addr)
        if payload:
            self.tx.set_desc(2 * slot, addr, HEADER_SIZE, VRING_DESC_F_NEXT, 2 * slot + 1)
            self.tx.set_desc(2 * slot + 1, addr + HEADER_SIZE, len(payload))
        else:
            self.tx.set_desc(2 * slot, addr, HEADER_SIZE)
        self.tx.offer(2 * slot)
        os.eventfd_write(self.kick[1], 1)

    def send_raw_chain(self, descs: list[tuple[int, int, int]]) -> None:
        """Queue a hand-made (possibly bogus) chain at the end of the descriptor table."""
        first = NUM - len(descs)
        for i, (addr, length, flags) in enumerate(descs):
            self.tx.set_desc(first + i, addr, length, flags, first + i + 1)
        self.tx.offer(first)
        os.eventfd_write(self.kick[1], 1)

    def _reclaim_tx(self) -> None:
        for head, _ in self.tx.take_used():
            if head < NUM - 4:
                self.tx_free.append(head // 2)

    def poll(self, timeout: float = WAIT) -> list[tuple[VsockHeader, bytes]]:
        """Packets the backend delivered on rx; re-posts their buffers."""
        select.select([self.call[0]], [], [], timeout)
        try:
            os.eventfd_read(self.call[0])
        except BlockingIOError:
            pass
        got = []
        for head, length in self.rx.take_used():
            raw = os.pread(self.ram, length, self.rx_bufs + head * RX_BUF)
            hdr = VsockHeader.unpack(raw)
            assert length == HEADER_SIZE + hdr.len, "used length must cover header + payload"
            got.append((hdr, raw[HEADER_SIZE:]))
            self.rx.offer(head)
        if got:
            os.eventfd_write(self.kick[0], 1)
        return got

    def expect(self, op: int, timeout: float = WAIT, **fields: int) -> tuple[VsockHeader, bytes]:
        """The next packet with this op (others are kept in the inbox)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (hdr, data) in enumerate(self.inbox):
                if hdr.op == op and all(getattr(hdr, k) == v for k, v in fields.items()):
                    del self.inbox[i]
                    return hdr, data
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {Op(op).name} {fields} in {[h.describe() for h, _ in self.inbox]}")
            self.inbox.extend(self.poll(min(left, 0.2)))

    def pkt(self, op: int, src_port: int, dst_port: int, buf_alloc: int = 256 * 1024,
            fwd_cnt: int = 0, flags: int = 0) -> VsockHeader:
        return VsockHeader(src_cid=CID, dst_cid=2, src_port=src_port, dst_port=dst_port,
                           op=op, flags=flags, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt)


@pytest.fixture
def env(tmp_path):
    backend = VsockBackend(tmp_path / "vhost.sock", tmp_path / "vsock.sock", CID,
                           buf_alloc=64 * 1024)
    thread = threading.Thread(target=backend.run, daemon=True)
    thread.start()
    guest = FakeGuest(tmp_path / "vhost.sock")
    guest.realize()
    guest.start()
    guest.post_rx()
    yield backend, guest, tmp_path
    guest.close()
    backend.stop()
    thread.join(WAIT)
    assert not thread.is_alive()


def host_listen(tmp_path: Path, port: int) -> socket.socket:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(tmp_path / f"vsock.sock_{port}"))
    ls.listen(8)
    ls.settimeout(WAIT)
    return ls


def host_connect(tmp_path: Path, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(str(tmp_path / "vsock.sock"))
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def eventually(condition, timeout: float = WAIT) -> bool:
    """Poll a condition on backend state (it changes in the backend's thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def read_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def test_realize_negotiates_what_qemu_needs(tmp_path):
    backend = VsockBackend(tmp_path / "v.sock", tmp_path / "u.sock", CID)
    thread = threading.Thread(target=backend.run, daemon=True)
    thread.start()
    guest = FakeGuest(tmp_path / "v.sock")
    features, pfeatures, config = guest.realize()
    assert features == (1 << 32) | (1 << 30)
    assert pfeatures == 1 << 9
    assert config == struct.pack("<III", 0, 8, 0) + struct.pack("<Q", CID)
    guest.sock.close()  # QEMU goes away: the backend stops and cleans up
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not (tmp_path / "v.sock").exists() and not (tmp_path / "u.sock").exists()
    guest.close()


def test_guest_connects_to_a_host_listener_and_talks_both_ways(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 700)
    guest.send(guest.pkt(Op.REQUEST, 1111, 700))
    resp, _ = guest.expect(Op.RESPONSE, dst_port=1111, src_port=700)
    assert resp.dst_cid == CID and resp.src_cid == 2 and resp.buf_alloc == 64 * 1024
    host, _ = ls.accept()
    host.settimeout(WAIT)
    guest.send(guest.pkt(Op.RW, 1111, 700), b"hello host")
    assert read_exactly(host, 10) == b"hello host"
    host.sendall(b"hello guest")
    data = b""
    while len(data) < 11:
        _, chunk = guest.expect(Op.RW, dst_port=1111)
        data += chunk
    assert data == b"hello guest"
    # guest half-closes: the host reads EOF and can still answer
    guest.send(guest.pkt(Op.SHUTDOWN, 1111, 700, flags=SHUTDOWN_SEND))
    assert host.recv(10) == b""
    host.sendall(b"bye")
    _, chunk = guest.expect(Op.RW, dst_port=1111)
    assert chunk == b"bye"
    host.close()
    # host EOF: SHUTDOWN with SEND only, then (both sides done) RST
    shut, _ = guest.expect(Op.SHUTDOWN, dst_port=1111)
    assert shut.flags == SHUTDOWN_SEND
    guest.expect(Op.RST, dst_port=1111)
    ls.close()


def test_guest_connect_without_listener_is_reset(env):
    _, guest, _ = env
    guest.send(guest.pkt(Op.REQUEST, 2222, 701))
    rst, _ = guest.expect(Op.RST, dst_port=2222)
    assert rst.src_port == 701


def test_packets_for_unknown_connections_are_reset(env):
    _, guest, _ = env
    guest.send(guest.pkt(Op.RW, 2223, 702), b"stray")
    guest.expect(Op.RST, dst_port=2223)
    guest.send(guest.pkt(Op.RST, 2224, 702))  # never answered
    guest.send(guest.pkt(Op.REQUEST, 2225, 703))
    guest.expect(Op.RST, dst_port=2225)
    assert not [h for h, _ in guest.inbox if h.dst_port == 2224]


def test_host_connect_handshake(env):
    _, guest, tmp = env
    host = host_connect(tmp, 80)
    req, _ = guest.expect(Op.REQUEST, dst_port=80)
    assert req.src_port >= 1 << 30 and req.dst_cid == CID
    guest.send(guest.pkt(Op.RESPONSE, 80, req.src_port))
    line = b""
    while not line.endswith(b"\n"):
        line += host.recv(1)
    assert line == f"OK {req.src_port}\n".encode()
    host.sendall(b"ping")
    _, data = guest.expect(Op.RW, dst_port=80)
    assert data == b"ping"
    guest.send(guest.pkt(Op.RW, 80, req.src_port), b"pong")
    assert read_exactly(host, 4) == b"pong"
    # the guest closes both directions: RST back, host sees EOF
    guest.send(guest.pkt(Op.SHUTDOWN, 80, req.src_port, flags=SHUTDOWN_BOTH))
    guest.expect(Op.RST, dst_port=80)
    assert host.recv(10) == b""


def test_host_connect_refused_by_the_guest_closes_the_host_socket(env):
    _, guest, tmp = env
    host = host_connect(tmp, 81)
    req, _ = guest.expect(Op.REQUEST, dst_port=81)
    guest.send(guest.pkt(Op.RST, 81, req.src_port))
    assert host.recv(100) == b""  # no OK line: closed


def test_host_giving_up_before_the_guest_answers_resets_the_request(env):
    _, guest, tmp = env
    host = host_connect(tmp, 82)
    req, _ = guest.expect(Op.REQUEST, dst_port=82)
    host.close()
    guest.expect(Op.RST, dst_port=82, src_port=req.src_port)


def test_host_half_close_before_the_answer_is_not_a_hang_up(env):
    _, guest, tmp = env
    host = host_connect(tmp, 83)
    host.shutdown(socket.SHUT_WR)  # nothing to send, still waiting for OK and the reply
    req, _ = guest.expect(Op.REQUEST, dst_port=83)
    time.sleep(0.1)
    guest.send(guest.pkt(Op.RESPONSE, 83, req.src_port))
    assert read_exactly(host, len(f"OK {req.src_port}\n")) == f"OK {req.src_port}\n".encode()
    shut, _ = guest.expect(Op.SHUTDOWN, dst_port=83)
    assert shut.flags == SHUTDOWN_SEND
    guest.send(guest.pkt(Op.RW, 83, req.src_port), b"reply")
    assert read_exactly(host, 5) == b"reply"


def test_host_data_sent_before_the_answer_is_delivered(env):
    _, guest, tmp = env
    host = host_connect(tmp, 84)
    host.sendall(b"early")
    req, _ = guest.expect(Op.REQUEST, dst_port=84)
    time.sleep(0.1)
    guest.send(guest.pkt(Op.RESPONSE, 84, req.src_port))
    assert read_exactly(host, len(f"OK {req.src_port}\n")) == f"OK {req.src_port}\n".encode()
    _, data = guest.expect(Op.RW, dst_port=84)
    assert data == b"early"


def test_bad_connect_line_is_closed(env):
    _, _, tmp = env
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(str(tmp / "vsock.sock"))
    s.sendall(b"HELLO there\n")
    assert s.recv(10) == b""


def test_host_to_guest_respects_guest_credit_and_rx_buffer_size(env):
    _, guest, tmp = env
    host = host_connect(tmp, 90)
    req, _ = guest.expect(Op.REQUEST, dst_port=90)
    window = 10_000
    guest.send(guest.pkt(Op.RESPONSE, 90, req.src_port, buf_alloc=window))
    read_exactly(host, len(f"OK {req.src_port}\n"))
    payload = os.urandom(50_000)
    host.sendall(payload)
    got = b""
    deadline = time.monotonic() + WAIT
    while len(got) < window and time.monotonic() < deadline:
        for hdr, data in guest.poll(0.2):
            assert hdr.op == Op.RW and hdr.len <= RX_BUF - HEADER_SIZE
            got += data
    assert len(got) == window  # exactly the credit, not a byte more
    assert not [h for h, _ in guest.poll(0.3) if h.op == Op.RW]
    # the guest application consumed it all: credit update, the rest flows
    guest.send(guest.pkt(Op.CREDIT_UPDATE, 90, req.src_port, buf_alloc=window, fwd_cnt=window))
    while len(got) < 2 * window:
        for hdr, data in guest.poll(0.5):
            got += data
    guest.send(guest.pkt(Op.CREDIT_UPDATE, 90, req.src_port, buf_alloc=1 << 20,
                         fwd_cnt=2 * window))
    while len(got) < len(payload):
        for hdr, data in guest.poll(0.5):
            got += data
    assert got == payload


def test_guest_to_host_credit_counts_only_delivered_bytes(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 703)
    guest.send(guest.pkt(Op.REQUEST, 3000, 703))
    resp, _ = guest.expect(Op.RESPONSE, dst_port=3000)
    window = resp.buf_alloc
    host, _ = ls.accept()
    host.settimeout(WAIT)
    # the host does not read: fill the socket and our window, within credit
    chunk = b"z" * 4096
    sent = 0
    for _ in range(200):  # well past what a unix socket buffers
        conn = backend.conns.get(703, 3000)
        if conn is not None and conn.buffered_from_guest() + len(chunk) > window:
            break
        guest.send(guest.pkt(Op.RW, 3000, 703), chunk)
        sent += len(chunk)
        time.sleep(0.002)
    conn = backend.conns.get(703, 3000)
    assert eventually(lambda: conn.rx_cnt == sent)  # all of it reached the backend
    assert conn.to_host, "the host socket should be full by now"
    assert conn.fwd_cnt == sent - len(conn.to_host)
    # other connections are not held up by the stuck one
    ls2 = host_listen(tmp, 704)
    guest.send(guest.pkt(Op.REQUEST, 3001, 704))
    guest.expect(Op.RESPONSE, dst_port=3001)
    other, _ = ls2.accept()
    other.settimeout(WAIT)
    guest.send(guest.pkt(Op.RW, 3001, 704), b"not stuck")
    assert read_exactly(other, 9) == b"not stuck"
    # the host reads everything; credit updates announce it, nothing is lost
    assert read_exactly(host, sent) == chunk * (sent // len(chunk))
    deadline = time.monotonic() + WAIT
    last_fwd = 0
    while last_fwd != sent and time.monotonic() < deadline:
        guest.inbox.extend(guest.poll(0.2))
        for hdr, _ in guest.inbox:
            if hdr.dst_port == 3000:
                last_fwd = max(last_fwd, hdr.fwd_cnt)
    assert last_fwd == sent or sent - last_fwd < window // 4
    ls.close()
    ls2.close()


def test_guest_overrunning_credit_is_reset(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 705)
    guest.send(guest.pkt(Op.REQUEST, 3002, 705))
    guest.expect(Op.RESPONSE, dst_port=3002)
    host, _ = ls.accept()
    host.settimeout(WAIT)
    chunk = b"o" * TX_SLOT
    for _ in range(40):  # 2.5 MB, the host never reads: far beyond socket + window
        guest.send(guest.pkt(Op.RW, 3002, 705), chunk)
        if any(h.op == Op.RST for h, _ in guest.poll(0)):
            break
    else:
        guest.expect(Op.RST, dst_port=3002)
    assert eventually(lambda: backend.conns.get(705, 3002) is None)


def test_malformed_tx_chains_do_not_stop_the_backend(env):
    _, guest, tmp = env
    guest.send_raw_chain([(RAM - 10, 44, 0)])  # header beyond guest RAM
    guest.send_raw_chain([(guest.tx_bufs, 20, 0)])  # shorter than a header
    guest.send_raw_chain([(guest.tx_bufs, 44, VRING_DESC_F_WRITE)])  # no readable part
    guest.send(guest.pkt(Op.REQUEST, 4000, 706))
    guest.expect(Op.RST, dst_port=4000)  # still serving


def test_ring_stop_and_restart_keeps_connections(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 707)
    guest.send(guest.pkt(Op.REQUEST, 5000, 707))
    guest.expect(Op.RESPONSE, dst_port=5000)
    host, _ = ls.accept()
    host.settimeout(WAIT)
    bases = guest.stop()
    assert bases[1] == guest.tx.avail_idx  # everything offered on tx was consumed
    host.sendall(b"while stopped")
    time.sleep(0.2)
    assert not guest.poll(0.1)  # a stopped ring gets nothing
    guest.start(bases)
    guest.post_rx(0)
    data = b""
    while len(data) < 13:
        _, chunk = guest.expect(Op.RW, dst_port=5000)
        data += chunk
    assert data == b"while stopped"


def test_reset_owner_drops_all_connections(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 708)
    guest.send(guest.pkt(Op.REQUEST, 6000, 708))
    guest.expect(Op.RESPONSE, dst_port=6000)
    host, _ = ls.accept()
    host.settimeout(WAIT)
    guest.msg(Request.RESET_OWNER)
    assert host.recv(10) == b""
    assert eventually(lambda: len(backend.conns) == 0)


def test_qemu_disconnect_closes_host_sockets_and_stops(tmp_path):
    backend = VsockBackend(tmp_path / "v.sock", tmp_path / "u.sock", CID)
    thread = threading.Thread(target=backend.run, daemon=True)
    thread.start()
    guest = FakeGuest(tmp_path / "v.sock")
    guest.realize()
    guest.start()
    guest.post_rx()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(WAIT)
    host.connect(str(tmp_path / "u.sock"))
    host.sendall(b"CONNECT 5\n")
    req, _ = guest.expect(Op.REQUEST, dst_port=5)
    guest.send(guest.pkt(Op.RESPONSE, 5, req.src_port))
    assert host.recv(100).startswith(b"OK ")
    guest.sock.close()
    assert host.recv(10) == b""
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not (tmp_path / "v.sock").exists()
    guest.close()


# --- the HybridVsock transport over a real backend process ---------------------------------


def test_hybrid_transport_connect_and_listen_through_the_backend_process(tmp_path):
    from vmrun.errors import VsockError
    from vmrun.hypervisor.vsock.hybrid import HybridVsock

    with HybridVsock(tmp_path, CID) as transport:
        guest = FakeGuest(transport.socket_path)
        guest.realize()
        guest.start()
        guest.post_rx()
        result: dict[str, object] = {}

        def connect(port: int) -> None:
            try:
                result[port] = transport.connect(port, timeout=WAIT)
            except VsockError as exc:
                result[port] = exc

        # accepted by the guest
        t = threading.Thread(target=connect, args=(1024,))
        t.start()
        req, _ = guest.expect(Op.REQUEST, dst_port=1024)
        guest.send(guest.pkt(Op.RESPONSE, 1024, req.src_port))
        guest.send(guest.pkt(Op.RW, 1024, req.src_port), b"first bytes")
        t.join(WAIT)
        sock = result[1024]
        assert isinstance(sock, socket.socket)
        sock.settimeout(WAIT)
        assert read_exactly(sock, 11) == b"first bytes"  # nothing lost to the handshake
        sock.close()
        # refused by the guest
        t = threading.Thread(target=connect, args=(1025,))
        t.start()
        req, _ = guest.expect(Op.REQUEST, dst_port=1025)
        guest.send(guest.pkt(Op.RST, 1025, req.src_port))
        t.join(WAIT)
        assert isinstance(result[1025], VsockError) and "refused" in str(result[1025])
        # guest -> host through listen()
        ls = transport.listen(9999)
        assert transport.port_path(9999).exists()
        guest.send(guest.pkt(Op.REQUEST, 4444, 9999))
        guest.expect(Op.RESPONSE, dst_port=4444)
        ls.settimeout(WAIT)
        conn, _ = ls.accept()
        conn.close()
        guest.close()
    assert not transport.socket_path.exists() and not transport.uds_path.exists()
    assert not transport.port_path(9999).exists()
