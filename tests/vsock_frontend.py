"""A fake QEMU + guest driver for the vsock vhost-user backend, shared by the tests.

It speaks vhost-user like QEMU 7.2 does (same message sequence), shares a memfd as guest
RAM, and plays the guest's virtio-vsock driver on the rx/tx split rings in it: politely
(tests/unit/test_vsock_backend.py) or as a hostile guest kernel
(tests/security/test_vsock_flood.py).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from pathlib import Path

from vmrun.hypervisor.vsock.vhost_user import protocol as proto
from vmrun.hypervisor.vsock.vhost_user.packet import HEADER_SIZE, Op, VsockHeader
from vmrun.hypervisor.vsock.vhost_user.protocol import MemRegionDesc, Request, VringAddr
from vmrun.hypervisor.vsock.vhost_user.virtqueue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

CID = 42
UVA = 0x7F12_0000_0000  # "QEMU's" mapping of guest RAM; guest-physical base is 0
RAM = 4 * 1024 * 1024
NUM = 64
RX_BUF = 3776  # what Linux 6.1 posts, header included
TX_SLOT = 64 * 1024
WAIT = 5.0
# Where the hostile driver keeps its packet templates: past the polite driver's buffers.
FLOOD_HEADERS = 0x280000
FLOOD_PAYLOAD = 0x300000


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

    def used_idx(self) -> int:
        return struct.unpack("<H", os.pread(self.fd, 2, self.used + 2))[0]

    def publish(self, avail_idx: int) -> None:
        """Move avail idx on without writing ring entries (they were written ahead)."""
        self.avail_idx = avail_idx & 0xFFFF
        os.pwrite(self.fd, struct.pack("<H", self.avail_idx), self.avail + 2)

    def fill_avail_ring(self, head_of_slot) -> None:
        """Write every avail ring entry at once: slot s offers head_of_slot(s)."""
        entries = struct.pack(f"<{self.num}H", *(head_of_slot(s) for s in range(self.num)))
        os.pwrite(self.fd, entries, self.avail + 4)

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

    # --- a hostile driver --------------------------------------------------------------------

    def flood(self, packets: list[tuple[VsockHeader, int]], seconds: float,
              refill_rx: bool) -> int:
        """Offer `packets` on tx over and over for `seconds`; how many the backend took.

        Each (header, payload length) gets one descriptor (a chain of two with a payload,
        read from FLOOD_PAYLOAD), and every avail entry names one of them: a hostile driver
        re-offers its descriptors without waiting for them back, so the whole flood costs
        one avail idx store and one kick per batch. With `refill_rx`, every rx buffer is
        handed straight back (what the backend wrote there is never read); without, the
        backend gets no rx buffer at all for its replies.
        """
        heads = []
        desc = 0
        for i, (hdr, length) in enumerate(packets):
            hdr.len = length
            addr = FLOOD_HEADERS + 64 * i
            os.pwrite(self.ram, hdr.pack(), addr)
            heads.append(desc)
            if length:
                self.tx.set_desc(desc, addr, HEADER_SIZE, VRING_DESC_F_NEXT, desc + 1)
                self.tx.set_desc(desc + 1, FLOOD_PAYLOAD, length)
                desc += 2
            else:
                self.tx.set_desc(desc, addr, HEADER_SIZE)
                desc += 1
        assert desc <= NUM, "too many flood packets for the descriptor table"
        self.tx.fill_avail_ring(lambda slot: heads[slot % len(heads)])
        if refill_rx:
            self.rx.fill_avail_ring(lambda slot: slot)
        start = self.tx.used_idx()
        taken = 0
        last = start
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            used = self.tx.used_idx()
            taken += (used - last) & 0xFFFF
            last = used
            if (self.tx.avail_idx - used) & 0xFFFF < NUM:
                self.tx.publish(used + NUM)
                os.eventfd_write(self.kick[1], 1)
            if refill_rx:
                rx_used = self.rx.used_idx()
                if (self.rx.avail_idx - rx_used) & 0xFFFF < NUM:
                    self.rx.publish(rx_used + NUM)
                    os.eventfd_write(self.kick[0], 1)
            time.sleep(0.0002)  # two cores: leave the backend the other one
        return taken

    def resync(self, timeout: float = WAIT) -> None:
        """Back to the polite driver after a flood: take every reply the backend still owes
        (dropping them) until tx is all consumed and rx goes quiet, then forget both rings'
        history."""
        for i in range(NUM):
            self.rx.set_desc(i, self.rx_bufs + i * RX_BUF, RX_BUF, VRING_DESC_F_WRITE)
        self.rx.fill_avail_ring(lambda slot: slot)
        deadline = time.monotonic() + timeout
        last, quiet_since = None, time.monotonic()
        while True:
            assert time.monotonic() < deadline, "the backend stopped consuming tx"
            state = (self.tx.used_idx(), self.rx.used_idx())
            if state != last:
                last, quiet_since = state, time.monotonic()
            elif state[0] == self.tx.avail_idx and time.monotonic() - quiet_since > 0.2:
                break
            self.rx.publish(state[1] + NUM)
            os.eventfd_write(self.kick[0], 1)
            os.eventfd_write(self.kick[1], 1)
            time.sleep(0.01)
        self.rx.seen_used = self.rx.used_idx()
        self.rx.publish(self.rx.seen_used + NUM)
        os.eventfd_write(self.kick[0], 1)
        self.tx.seen_used = self.tx.used_idx()
        self.tx_free = list(range(NUM // 2))
        self.inbox.clear()
