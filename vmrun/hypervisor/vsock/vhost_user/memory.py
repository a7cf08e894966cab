"""Guest memory as QEMU shares it with us (SET_MEM_TABLE).

QEMU passes one fd per RAM region (hence `share=on` guest memory); we mmap each one and
hand out memoryviews into the mappings, so packet payloads move between guest RAM and
host sockets without intermediate copies.

Two address spaces point into the same regions: the virtqueue descriptors carry
guest-physical addresses (what the guest driver wrote), while SET_VRING_ADDR carries QEMU's
own virtual addresses of the rings. Both are translated here, and both are checked: the
addresses come from the guest (or QEMU on its behalf) and are not to be trusted.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Sequence

from .protocol import MemRegionDesc


class GuestMemoryError(ValueError):
    """An address range that does not lie inside one mapped region."""


@dataclass
class MemoryRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    _mmap: mmap.mmap = field(repr=False)
    _view: memoryview = field(repr=False)

    @classmethod
    def map_fd(cls, desc: MemRegionDesc, fd: int) -> "MemoryRegion":
        if desc.memory_size <= 0:
            raise GuestMemoryError("memory region of size 0")
        # Map from the start of the fd: mmap_offset need not be page aligned, and
        # mapping [0, offset+size) keeps the arithmetic trivial.
        m = mmap.mmap(
            fd, desc.mmap_offset + desc.memory_size,
            flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        return cls(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr,
                   desc.mmap_offset, m, memoryview(m))

    def close(self) -> None:
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            # A slice handed out earlier is still alive somewhere; the mapping goes away
            # when the last reference does.
            pass


class GuestMemory:
    """The current memory table; empty until QEMU sends SET_MEM_TABLE."""

    def __init__(self, regions: Sequence[MemoryRegion] = ()) -> None:
        self.regions: list[MemoryRegion] = list(regions)

    @classmethod
    def from_table(cls, descs: Sequence[MemRegionDesc], fds: Sequence[int]) -> "GuestMemory":
        """mmap every region; the fds are closed here whatever happens (the maps keep RAM)."""
        try:
            if len(descs) != len(fds):
                raise GuestMemoryError(f"{len(descs)} memory regions but {len(fds)} fds")
            regions: list[MemoryRegion] = []
            try:
                for desc, fd in zip(descs, fds):
                    regions.append(MemoryRegion.map_fd(desc, fd))
            except (OSError, ValueError) as exc:
                for region in regions:
                    region.close()
                raise GuestMemoryError(f"cannot map guest memory: {exc}") from exc
            return cls(regions)
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __bool__(self) -> bool:
        return bool(self.regions)

    def _lookup(self, addr: int, length: int, user: bool) -> memoryview:
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"bad range {addr:#x}+{length}")
        for region in self.regions:
            base = region.user_addr if user else region.guest_phys_addr
            offset = addr - base
            if 0 <= offset and offset + length <= region.size:
                start = region.mmap_offset + offset
                return region._view[start: start + length]
        kind = "user" if user else "guest-physical"
        raise GuestMemoryError(f"{kind} range {addr:#x}+{length} is outside guest memory")

    def gpa(self, addr: int, length: int) -> memoryview:
        """A view of `length` bytes at guest-physical address `addr` (descriptor buffers)."""
        return self._lookup(addr, length, user=False)

    def uva(self, addr: int, length: int) -> memoryview:
        """A view of `length` bytes at QEMU virtual address `addr` (ring addresses)."""
        return self._lookup(addr, length, user=True)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
