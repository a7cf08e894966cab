"""Guest memory mapping and address translation."""

import os

import pytest

from vmrun.hypervisor.vsock.vhost_user.memory import GuestMemory, GuestMemoryError
from vmrun.hypervisor.vsock.vhost_user.protocol import MemRegionDesc

PAGE = 4096


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("vsock-test")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def two_regions():
    """Low RAM at gpa 0 (uva 0x7f0000000000) and high RAM at gpa 4G, at offset 2 pages
    of its fd (uva 0x7f8000000000), as QEMU lays out memory around the PCI hole."""
    low = memfd(4 * PAGE, bytes(range(256)) * 16)
    high = memfd(4 * PAGE)
    os.pwrite(high, b"HIGH", 2 * PAGE)
    keep = [os.dup(low), os.dup(high)]
    mem = GuestMemory.from_table(
        [MemRegionDesc(0, 4 * PAGE, 0x7F00_0000_0000, 0),
         MemRegionDesc(0x1_0000_0000, 2 * PAGE, 0x7F80_0000_0000, 2 * PAGE)],
        [low, high],
    )
    yield mem, keep
    mem.close()
    for fd in keep:
        os.close(fd)


def test_from_table_closes_the_fds(two_regions):
    mem, _ = two_regions
    fd = memfd(PAGE)
    dup = os.dup(fd)
    GuestMemory.from_table([MemRegionDesc(0, PAGE, 0, 0)], [fd]).close()
    with pytest.raises(OSError):
        os.fstat(fd)
    os.close(dup)


def test_gpa_and_uva_translate_to_the_same_bytes(two_regions):
    mem, _ = two_regions
    assert bytes(mem.gpa(0x10, 4)) == bytes([0x10, 0x11, 0x12, 0x13])
    assert bytes(mem.uva(0x7F00_0000_0000 + 0x10, 4)) == bytes([0x10, 0x11, 0x12, 0x13])
    # the high region starts at mmap_offset within its fd
    assert bytes(mem.gpa(0x1_0000_0000, 4)) == b"HIGH"
    assert bytes(mem.uva(0x7F80_0000_0000, 4)) == b"HIGH"


def test_writes_through_views_reach_the_shared_memory(two_regions):
    mem, (low, high) = two_regions
    mem.gpa(PAGE + 3, 5)[:] = b"hello"
    assert os.pread(low, 5, PAGE + 3) == b"hello"
    mem.uva(0x7F80_0000_0000 + 8, 3)[:] = b"abc"
    assert os.pread(high, 3, 2 * PAGE + 8) == b"abc"


@pytest.mark.parametrize("addr,length", [
    (4 * PAGE - 2, 4),  # runs off the end of low RAM
    (4 * PAGE, 1),  # in the hole
    (0x1_0000_0000 + 2 * PAGE, 1),  # just past high RAM
    (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wraps
    (-1, 1),
])
def test_out_of_range_guest_addresses_are_rejected(two_regions, addr, length):
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.gpa(addr, length)


def test_user_and_guest_addresses_are_not_interchangeable(two_regions):
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.uva(0x10, 4)
    with pytest.raises(GuestMemoryError):
        mem.gpa(0x7F00_0000_0000, 4)


def test_zero_length_at_the_end_is_fine(two_regions):
    mem, _ = two_regions
    assert len(mem.gpa(4 * PAGE, 0)) == 0


def test_region_and_fd_count_must_match():
    fd = memfd(PAGE)
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_table([], [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed anyway


def test_empty_memory_is_falsy_and_translates_nothing():
    mem = GuestMemory()
    assert not mem
    with pytest.raises(GuestMemoryError):
        mem.gpa(0, 1)


def test_close_survives_live_views(two_regions):
    mem, _ = two_regions
    view = mem.gpa(0, 8)
    mem.close()  # must not raise although `view` still exports the buffer
    assert not mem
    del view
