"""Split virtqueue: popping descriptor chains and pushing used entries on a fake ring."""

import mmap
import os
import struct
import time

import pytest

from vmrun.hypervisor.vsock.vhost_user.memory import GuestMemory
from vmrun.hypervisor.vsock.vhost_user.protocol import MemRegionDesc
from vmrun.hypervisor.vsock.vhost_user.virtqueue import (
    MAX_CHAIN_LEN, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, RingError,
    Virtqueue, scatter, split_at, truncate,
)

GPA = 0x10_0000  # guest-physical base of the fake RAM
UVA = 0x7F00_0000_0000  # where "QEMU" has it mapped
SIZE = 64 * 1024
DESC, AVAIL, USED, BUFS = 0x0, 0x1000, 0x2000, 0x4000
NUM = 8


class FakeRing:
    """The driver's side: writes descriptors and avail entries, reads used entries."""

    def __init__(self, num: int = NUM) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, SIZE)
        self.memory = GuestMemory.from_table([MemRegionDesc(GPA, SIZE, UVA, 0)], [os.dup(self.fd)])
        self.num = num
        self.avail_idx = 0
        self.vq = Virtqueue(1)
        self.vq.set_num(num)
        self.vq.set_addr(UVA + DESC, UVA + USED, UVA + AVAIL)
        self.vq.set_memory(self.memory)
        self.vq.set_base(0)
        self.kick_r, self.kick_w = os.pipe()
        self.vq.set_kick_fd(self.kick_r)
        self.vq.enabled = True

    def close(self) -> None:
        self.vq.reset()
        self.memory.close()
        os.close(self.fd)
        os.close(self.kick_w)

    def write(self, off: int, data: bytes) -> None:
        os.pwrite(self.fd, data, off)

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, off)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def make_available(self, head: int) -> None:
        self.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack("<H", self.read(USED + 2, 2))[0]
        elems = [struct.unpack("<II", self.read(USED + 4 + 8 * i, 8)) for i in range(self.num)]
        return idx, elems


@pytest.fixture
def ring():
    r = FakeRing()
    yield r
    r.close()


def test_empty_ring_pops_nothing(ring):
    assert ring.vq.ready
    assert ring.vq.available() == 0
    assert ring.vq.pop() is None


def test_pop_chain_with_readable_then_writable_buffers(ring):
    ring.write(BUFS, b"header..")
    ring.write(BUFS + 0x100, b"payload")
    ring.desc(3, GPA + BUFS, 8, VRING_DESC_F_NEXT, 5)
    ring.desc(5, GPA + BUFS + 0x100, 7, VRING_DESC_F_NEXT, 1)
    ring.desc(1, GPA + BUFS + 0x200, 16, VRING_DESC_F_WRITE)
    ring.make_available(3)
    assert ring.vq.available() == 1
    chain = ring.vq.pop()
    assert chain is not None and chain.error is None
    assert chain.head == 3
    assert [bytes(v) for v in chain.readable] == [b"header..", b"payload"]
    assert chain.readable_len == 15 and chain.writable_len == 16
    chain.writable[0][:4] = b"resp"  # lands in guest memory
    assert ring.read(BUFS + 0x200, 4) == b"resp"
    assert ring.vq.pop() is None


def test_push_publishes_used_entries(ring):
    ring.desc(0, GPA + BUFS, 64, VRING_DESC_F_WRITE)
    ring.desc(1, GPA + BUFS + 64, 64, VRING_DESC_F_WRITE)
    ring.make_available(1)
    ring.make_available(0)
    a, b = ring.vq.pop(), ring.vq.pop()
    ring.vq.push(a.head, 44)
    ring.vq.push(b.head, 0)
    idx, elems = ring.used()
    assert idx == 2
    assert elems[0] == (1, 44) and elems[1] == (0, 0)


def test_indices_wrap_around_16_bits(ring):
    ring.vq.set_base(0xFFFF)
    ring.avail_idx = 0xFFFF
    ring.write(USED + 2, struct.pack("<H", 0xFFFF))
    ring.vq.set_addr(UVA + DESC, UVA + USED, UVA + AVAIL)  # re-attach: used idx re-read
    ring.desc(2, GPA + BUFS, 4)
    ring.desc(4, GPA + BUFS, 4)
    ring.make_available(2)  # slot 0xFFFF % 8 == 7
    ring.make_available(4)  # idx wraps to 1, slot 0
    assert ring.vq.available() == 2
    assert ring.vq.pop().head == 2
    assert ring.vq.pop().head == 4
    assert ring.vq.last_avail_idx == 1
    ring.vq.push(2, 0)
    ring.vq.push(4, 0)
    idx, elems = ring.used()
    assert idx == 1 and elems[7] == (2, 0) and elems[0] == (4, 0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the race needs two CPUs at once")
def test_a_driver_reading_the_used_idx_meanwhile_sees_only_values_we_published(ring):
    """The guest's driver reads the used idx from another CPU while we store it. A store
    that passes through another value (struct.pack_into zeroes its destination first) makes
    the driver take a stale slot for a new entry ("rx:id N is not a head!"). A reader
    process polls the idx while we push for a second: it must never see it go back."""
    ring.desc(0, GPA + BUFS, 64, VRING_DESC_F_WRITE)
    ring.vq.set_base(0x8000)  # mid-range: a stray 0 is far behind, and the idx wraps during the run
    ring.avail_idx = 0x8000
    ring.write(USED + 2, struct.pack("<H", 0x8000))
    ring.vq.set_addr(UVA + DESC, UVA + USED, UVA + AVAIL)  # re-attach: used idx re-read
    report_r, report_w = os.pipe()
    reader = os.fork()
    if reader == 0:  # the driver: count steps backwards until the parent sets the stop byte
        os.close(report_r)
        view = mmap.mmap(ring.fd, SIZE)
        last, backwards = 0x8000, 0
        deadline = time.monotonic() + 10  # should the parent die first
        while view[BUFS + 4096] == 0 and time.monotonic() < deadline:
            for _ in range(2000):
                idx = struct.unpack_from("<H", view, USED + 2)[0]
                backwards += (idx - last) & 0xFFFF > 0x8000
                last = idx
        os.write(report_w, str(backwards).encode())
        os._exit(0)
    os.close(report_w)
    try:
        pushed, end = 0, time.monotonic() + 1.0
        while time.monotonic() < end:
            for _ in range(500):
                ring.make_available(0)
                ring.vq.push(ring.vq.pop().head, 64)
                pushed += 1
    finally:
        ring.write(BUFS + 4096, b"\1")  # the reader stops
        backwards = int(os.read(report_r, 64) or b"-1")
        os.close(report_r)
        os.waitpid(reader, 0)
    assert pushed > 0x8000, pushed  # the idx wrapped meanwhile
    assert backwards == 0, f"the reader saw the used idx go back {backwards} times in {pushed} pushes"


def test_get_vring_base_stops_the_ring(ring):
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    ring.vq.pop()
    assert ring.vq.stop() == 1
    assert not ring.vq.ready and ring.vq.kick_fd is None
    ring.make_available(0)
    assert ring.vq.pop() is None  # stopped: nothing is processed


def test_disabled_ring_is_not_processed(ring):
    ring.vq.enabled = False
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    assert ring.vq.pop() is None
    ring.vq.enabled = True
    assert ring.vq.pop().head == 0


@pytest.mark.parametrize("setup,error", [
    (lambda r: r.desc(0, GPA + SIZE - 2, 4), "outside guest memory"),
    (lambda r: r.desc(0, 0x10, 4), "outside guest memory"),
    (lambda r: r.desc(0, GPA + BUFS, 16, VRING_DESC_F_INDIRECT), "indirect"),
    (lambda r: r.desc(0, GPA + BUFS, 4, VRING_DESC_F_NEXT, NUM), "out of range"),
    (lambda r: (r.desc(0, GPA + BUFS, 4, VRING_DESC_F_NEXT, 1),
                r.desc(1, GPA + BUFS, 4, VRING_DESC_F_NEXT, 0)), "loops"),
    (lambda r: (r.desc(0, GPA + BUFS, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                r.desc(1, GPA + BUFS, 4)), "readable descriptor after a writable"),
])
def test_malformed_chains_are_reported_not_raised(ring, setup, error):
    setup(ring)
    ring.make_available(0)
    chain = ring.vq.pop()
    assert chain.head == 0 and error in chain.error
    ring.vq.push(chain.head, 0)  # the caller hands it back unused
    assert ring.used()[0] == 1


def test_chain_length_is_bounded_below_the_ring_size():
    # A guest may offer one long chain in every avail entry: each pop walks at most
    # MAX_CHAIN_LEN descriptors, however large the table.
    big = FakeRing(num=4 * MAX_CHAIN_LEN)
    try:
        for i in range(MAX_CHAIN_LEN):
            big.desc(i, GPA + BUFS, 4, VRING_DESC_F_NEXT, i + 1)
        big.desc(MAX_CHAIN_LEN, GPA + BUFS, 4)  # the chain's end, one too far
        big.make_available(1)  # from 1: exactly MAX_CHAIN_LEN descriptors
        big.make_available(0)  # from 0: one more
        ok, too_long = big.vq.pop(), big.vq.pop()
        assert ok.error is None and len(ok.readable) == MAX_CHAIN_LEN
        assert too_long.error and "longer than" in too_long.error
        assert len(too_long.readable) == MAX_CHAIN_LEN
    finally:
        big.close()


def test_head_out_of_range_breaks_the_ring(ring):
    ring.make_available(NUM)
    with pytest.raises(RingError):
        ring.vq.pop()
    assert ring.vq.broken and not ring.vq.ready


def test_a_head_offered_again_while_we_hold_it_breaks_the_ring(ring):
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    ring.make_available(0)  # the driver hands out what is ours until we push it
    assert ring.vq.pop().head == 0
    with pytest.raises(RingError, match="again before it was used"):
        ring.vq.pop()
    assert ring.vq.broken


def test_a_head_offered_again_after_we_returned_it_is_fine(ring):
    ring.desc(0, GPA + BUFS, 4)
    for _ in range(3):
        ring.make_available(0)
        ring.vq.push(ring.vq.pop().head, 0)
    assert ring.used()[0] == 3 and not ring.vq.broken


@pytest.mark.parametrize("twice", [False, True])
def test_we_never_return_a_head_that_is_not_ours(ring, twice):
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    chain = ring.vq.pop()
    if twice:
        ring.vq.push(chain.head, 0)
    with pytest.raises(RingError, match="not ours to return"):
        ring.vq.push(chain.head if twice else 3, 0)
    assert ring.used()[0] == (1 if twice else 0)  # nothing bogus reaches the driver
    assert ring.vq.broken


def test_avail_idx_running_too_far_ahead_breaks_the_ring(ring):
    ring.write(AVAIL + 2, struct.pack("<H", NUM + 1))
    with pytest.raises(RingError):
        ring.vq.pop()
    assert ring.vq.broken


def test_ring_outside_memory_is_not_ready(ring):
    ring.vq.set_addr(UVA + SIZE - 8, UVA + USED, UVA + AVAIL)
    assert not ring.vq.ready and ring.vq.broken


def test_invalid_queue_sizes_are_refused():
    vq = Virtqueue(0)
    for num in (0, 3, 100, 65536):
        with pytest.raises(RingError):
            vq.set_num(num)
    vq.set_num(128)
    assert vq.num == 128


def test_kick_and_call_eventfds(ring):
    os.write(ring.kick_w, b"\1" * 8)
    ring.vq.drain_kick()
    with pytest.raises(BlockingIOError):
        os.read(ring.kick_r, 8)  # drained, and non-blocking
    call = os.eventfd(0, os.EFD_NONBLOCK)
    ring.vq.set_call_fd(os.dup(call))
    ring.vq.notify()  # nothing pushed: no interrupt
    with pytest.raises(BlockingIOError):
        os.read(call, 8)
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    ring.make_available(0)
    ring.vq.push(ring.vq.pop().head, 0)
    ring.vq.push(ring.vq.pop().head, 0)
    ring.vq.notify()
    assert int.from_bytes(os.read(call, 8), "little") == 1  # one interrupt per batch
    os.close(call)


def test_newest_call_fd_wins(ring):
    first, second = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    ring.vq.set_call_fd(os.dup(first))
    ring.vq.set_call_fd(os.dup(second))
    ring.desc(0, GPA + BUFS, 4)
    ring.make_available(0)
    ring.vq.push(ring.vq.pop().head, 0)
    ring.vq.notify()
    with pytest.raises(BlockingIOError):
        os.read(first, 8)
    assert os.read(second, 8)
    os.close(first)
    os.close(second)


def test_split_truncate_scatter():
    a, b, c = bytearray(b"0123456789"), bytearray(b"abc"), bytearray(b"XYZW")
    segs = [memoryview(a), memoryview(b), memoryview(c)]
    head, rest = split_at(segs, 12)
    assert head == b"0123456789ab"
    assert [bytes(v) for v in rest] == [b"c", b"XYZW"]
    assert [bytes(v) for v in truncate(rest, 3)] == [b"c", b"XY"]
    with pytest.raises(ValueError):
        split_at(segs, 18)
    assert scatter(segs, [b"HEAD", b"-payload-"]) == 13
    assert bytes(a) == b"HEAD-paylo" and bytes(b) == b"ad-" and bytes(c) == b"XYZW"
    with pytest.raises(ValueError):
        scatter(segs, [bytes(18)])
