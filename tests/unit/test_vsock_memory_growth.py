"""The vsock backend keeps running when QEMU sends a new memory table: guest memory grown
while the rings run (a new region), as when the host hot-plugs memory into the guest
(vmrun/sizing.py)."""

import os
import struct

import pytest

from vmrun.hypervisor.vsock.vhost_user import protocol as proto
from vmrun.hypervisor.vsock.vhost_user.device import TX, VhostUserDevice
from vmrun.hypervisor.vsock.vhost_user.protocol import MemRegionDesc, Message, Request
from vmrun.hypervisor.vsock.vhost_user.virtqueue import VRING_DESC_F_WRITE

LOW_SIZE = 64 * 1024
HIGH_GPA, HIGH_SIZE = 0x1_0000_0000, 64 * 1024
LOW_UVA, HIGH_UVA = 0x7F00_0000_0000, 0x7F80_0000_0000
DESC, AVAIL, USED, BUFS = 0x0, 0x1000, 0x2000, 0x4000
NUM = 8


def msg(request, payload=b"", fds=()):
    return Message(request, proto.VERSION, payload, list(fds))


class Guest:
    """The driver's side of the TX ring, in low memory; and a high region added later."""

    def __init__(self) -> None:
        self.low = os.memfd_create("low")
        os.ftruncate(self.low, LOW_SIZE)
        self.high = os.memfd_create("high")
        os.ftruncate(self.high, HIGH_SIZE)
        self.avail_idx = 0

    def table(self, grown: bool) -> Message:
        regions = [MemRegionDesc(0, LOW_SIZE, LOW_UVA, 0)]
        fds = [os.dup(self.low)]
        if grown:
            regions.append(MemRegionDesc(HIGH_GPA, HIGH_SIZE, HIGH_UVA, 0))
            fds.append(os.dup(self.high))
        return msg(Request.SET_MEM_TABLE, proto.encode_mem_table(regions), fds)

    def post(self, index: int, gpa: int, length: int, flags: int = 0) -> None:
        os.pwrite(self.low, struct.pack("<QIHH", gpa, length, flags, 0), DESC + 16 * index)
        os.pwrite(self.low, struct.pack("<H", index), AVAIL + 4 + 2 * (self.avail_idx % NUM))
        self.avail_idx += 1
        os.pwrite(self.low, struct.pack("<H", self.avail_idx), AVAIL + 2)

    def used_idx(self) -> int:
        return struct.unpack("<H", os.pread(self.low, 2, USED + 2))[0]

    def close(self) -> None:
        os.close(self.low)
        os.close(self.high)


@pytest.fixture
def running():
    """A device whose TX ring runs on low memory only."""
    guest = Guest()
    device = VhostUserDevice(bytes(8), lambda q, fd: None, lambda: None)
    device.handle(guest.table(grown=False))
    device.handle(msg(Request.SET_VRING_NUM, proto.vring_state_payload(TX, NUM)))
    device.handle(msg(Request.SET_VRING_ADDR, proto.encode_vring_addr(
        proto.VringAddr(TX, 0, LOW_UVA + DESC, LOW_UVA + USED, LOW_UVA + AVAIL, 0))))
    device.handle(msg(Request.SET_VRING_BASE, proto.vring_state_payload(TX, 0)))
    kick_r, kick_w = os.pipe()
    device.handle(msg(Request.SET_VRING_KICK, proto.u64_payload(TX), [kick_r]))
    device.handle(msg(Request.SET_VRING_ENABLE, proto.vring_state_payload(TX, 1)))
    yield guest, device
    device.reset()
    os.close(kick_w)
    guest.close()


def test_a_grown_memory_table_is_taken_while_the_ring_runs(running):
    guest, device = running
    ring = device.queues[TX]
    os.pwrite(guest.low, b"before", BUFS)
    guest.post(0, BUFS, 6)
    chain = ring.pop()
    assert chain is not None and [bytes(v) for v in chain.readable] == [b"before"]
    ring.push(chain.head, 0)
    # A buffer in memory the guest does not have yet is refused, not read.
    guest.post(1, HIGH_GPA, 4)
    refused = ring.pop()
    assert refused is not None and refused.error is not None
    ring.push(refused.head, 0)

    # A view into guest memory taken before the table changes stays valid after it (the
    # backend pushes every chain it pops in the same round, but a payload view may live on).
    guest.post(2, BUFS + 0x100, 16, VRING_DESC_F_WRITE)
    held = ring.pop()
    ring.push(held.head, 0)
    device.handle(guest.table(grown=True))
    held.writable[0][:4] = b"late"
    assert os.pread(guest.low, 4, BUFS + 0x100) == b"late"

    # The ring goes on where it was, and reaches the new memory.
    os.pwrite(guest.high, b"grown", 0x80)
    guest.post(3, HIGH_GPA + 0x80, 5)
    chain = ring.pop()
    assert chain is not None and chain.error is None
    assert [bytes(v) for v in chain.readable] == [b"grown"]
    ring.push(chain.head, 0)
    assert guest.used_idx() == 4
    assert [hex(r.guest_phys_addr) for r in device.memory.regions] == ["0x0", hex(HIGH_GPA)]
