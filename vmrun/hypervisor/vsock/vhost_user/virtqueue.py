"""One split virtqueue, driven from the device side.

Layout (virtio 1.x, split ring), all little-endian:
  descriptor table: num x {addr u64, len u32, flags u16, next u16}
  available ring:   flags u16, idx u16, ring[num] u16, (used_event u16)
  used ring:        flags u16, idx u16, ring[num] {id u32, len u32}, (avail_event u16)

The guest owns the descriptor table and the available ring, so everything read from them
is validated: a malformed chain is reported to the caller (which returns it unused) and a
ring whose indices make no sense is marked broken instead of crashing the backend.

Memory ordering: we only run on x86-64, whose total store order keeps our stores (used
element before used idx) and our loads (avail idx before ring entries) in program order.

What we store where the driver may be reading goes through typed memoryviews (one native
store each), never struct.pack_into: CPython's pack_into zeroes its destination before it
writes the value, and a vCPU reading the used idx in that instant takes 0 for the idx
(Linux: "rx:id N is not a head!", the queue dead). Native order is the ring's order here.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from dataclasses import dataclass, field

from .memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_EVENTFD_ONE = (1).to_bytes(8, "little")

if sys.byteorder != "little":  # the typed views below store in native order
    raise ImportError("the vhost-user vsock backend needs a little-endian host")

MAX_QUEUE_SIZE = 32768
# The longest descriptor chain we walk. Linux's virtio-vsock driver uses one descriptor per
# rx buffer and, on tx, one for the header, one for the linear data and one per skb
# fragment (at most 47 with the largest CONFIG_MAX_SKB_FRAGS, 45). A guest may offer one
# long chain in every avail entry: unbounded, each pop could walk the whole table (32768).
MAX_CHAIN_LEN = 64


def desc_table_size(num: int) -> int:
    return _DESC.size * num


def avail_ring_size(num: int) -> int:
    return 4 + 2 * num + 2


def used_ring_size(num: int) -> int:
    return 4 + _USED_ELEM.size * num + 2


class RingError(Exception):
    """The ring's indices are corrupt; the queue cannot be used any more."""


@dataclass
class DescChain:
    """One popped descriptor chain: device-readable buffers, then device-writable ones."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0
    error: str | None = None  # set when the chain was malformed; return it unused


class Virtqueue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.desc_addr = 0  # QEMU user addresses, from SET_VRING_ADDR
        self.avail_addr = 0
        self.used_addr = 0
        self.has_addr = False
        self.last_avail_idx = 0  # free-running u16: the next avail entry we will read
        self.used_idx = 0  # free-running u16: the next used entry we will write
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.started = False  # a kick fd arrived (ring runs), GET_VRING_BASE stops it
        self.enabled = False  # SET_VRING_ENABLE; starts disabled with protocol features
        self.broken = False
        self.memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used_idx: memoryview | None = None  # the used ring's idx, as one native u16
        self._used_elems: memoryview | None = None  # its {id, len} entries, as native u32s
        self.pushed = 0  # used entries written since the last notify()
        # Heads we popped and have not pushed back: a head is the driver's or ours, never
        # both. Returning one twice, or one we never got, is what a guest reports as
        # "id N is not a head!" before it stops the queue for good.
        self._held = bytearray()

    # --- configuration (vhost-user messages) ----------------------------------------------

    def set_num(self, num: int) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue {self.index}: invalid size {num}")
        self.num = num
        self._held = bytearray(num)
        self._detach()

    def set_addr(self, desc: int, used: int, avail: int) -> None:
        self.desc_addr, self.used_addr, self.avail_addr = desc, used, avail
        self.has_addr = True
        self._detach()

    def set_base(self, base: int) -> None:
        self.last_avail_idx = base & 0xFFFF

    def set_memory(self, memory: GuestMemory | None) -> None:
        self.memory = memory
        self._detach()

    def attach(self) -> bool:
        """Translate the ring addresses into views; False while something is missing."""
        if self._desc is not None:
            return True
        if not (self.memory and self.has_addr and self.num):
            return False
        try:
            self._desc = self.memory.uva(self.desc_addr, desc_table_size(self.num))
            self._avail = self.memory.uva(self.avail_addr, avail_ring_size(self.num))
            used = self.memory.uva(self.used_addr, used_ring_size(self.num))
            self._used_idx = used[2:4].cast("H")
            self._used_elems = used[4:4 + _USED_ELEM.size * self.num].cast("I")
        except GuestMemoryError as exc:
            log.error("queue %d: ring outside guest memory: %s", self.index, exc)
            self._detach()
            self.broken = True
            return False
        # Resume from where the used ring is (0 on a fresh ring, our last value after a
        # stop/start): the driver has consumed nothing past it.
        self.used_idx = self._used_idx[0]
        self.broken = False
        return True

    def _detach(self) -> None:
        for view in (self._desc, self._avail, self._used_idx, self._used_elems):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used_idx = self._used_elems = None

    def set_kick_fd(self, fd: int | None) -> None:
        self._close_fd("kick_fd")
        self.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        self.started = True

    def set_call_fd(self, fd: int | None) -> None:
        self._close_fd("call_fd")
        self.call_fd = fd

    def stop(self) -> int:
        """GET_VRING_BASE: stop processing; the reply is the next avail index to read."""
        self.started = False
        self._close_fd("kick_fd")
        if any(self._held):
            log.warning("queue %d stopped with %d chains not returned", self.index, sum(self._held))
            self._held = bytearray(self.num)
        return self.last_avail_idx

    def reset(self) -> None:
        self.stop()
        self._close_fd("call_fd")
        self._detach()
        self.num = 0
        self._held = bytearray()
        self.has_addr = False
        self.enabled = False
        self.broken = False
        self.last_avail_idx = self.used_idx = 0

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(self, name, None)

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and not self.broken and self.attach()

    # --- data path -------------------------------------------------------------------------

    def drain_kick(self) -> None:
        """Consume the kick eventfd's counter (call before looking at the ring)."""
        if self.kick_fd is None:
            return
        try:
            os.read(self.kick_fd, 8)
        except (BlockingIOError, InterruptedError):
            pass

    def _avail_idx(self) -> int:
        assert self._avail is not None
        idx: int = _U16.unpack_from(self._avail, 2)[0]
        if (idx - self.last_avail_idx) & 0xFFFF > self.num:
            self.broken = True
            raise RingError(
                f"queue {self.index}: avail idx {idx} is more than {self.num} ahead of "
                f"{self.last_avail_idx}"
            )
        return idx

    def available(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        if not self.ready:
            return 0
        return (self._avail_idx() - self.last_avail_idx) & 0xFFFF

    def pop(self) -> DescChain | None:
        """The next available descriptor chain, or None when the ring is empty."""
        if not self.ready:
            return None
        if self._avail_idx() == self.last_avail_idx:
            return None
        assert self._avail is not None and self._desc is not None and self.memory is not None
        slot = self.last_avail_idx % self.num
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= self.num:
            # No valid id to return it under: the ring is unusable.
            self.broken = True
            raise RingError(f"queue {self.index}: avail ring names descriptor {head} of {self.num}")
        if self._held[head]:
            self.broken = True
            raise RingError(f"queue {self.index}: descriptor {head} made available again before it was used")
        self._held[head] = 1
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        chain = DescChain(head)
        index = head
        for _ in range(min(self.num, MAX_CHAIN_LEN)):  # also stops a loop
            addr, length, flags, nxt = _DESC.unpack_from(self._desc, index * _DESC.size)
            if flags & VRING_DESC_F_INDIRECT:
                chain.error = "indirect descriptor (not negotiated)"
                return chain
            try:
                view = self.memory.gpa(addr, length)
            except GuestMemoryError as exc:
                chain.error = str(exc)
                return chain
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append(view)
                chain.writable_len += length
            elif chain.writable:
                chain.error = "readable descriptor after a writable one"
                return chain
            else:
                chain.readable.append(view)
                chain.readable_len += length
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if nxt >= self.num:
                chain.error = f"next descriptor {nxt} out of range"
                return chain
            index = nxt
        chain.error = f"descriptor chain loops or is longer than {MAX_CHAIN_LEN}"
        return chain

    def push(self, head: int, length: int) -> None:
        """Return a chain to the driver, `length` bytes written into its writable part."""
        assert self._used_idx is not None and self._used_elems is not None
        if not (0 <= head < len(self._held) and self._held[head]):
            self.broken = True
            raise RingError(f"queue {self.index}: descriptor {head} is not ours to return")
        self._held[head] = 0
        slot = 2 * (self.used_idx % self.num)
        self._used_elems[slot] = head
        self._used_elems[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is stored before the index that publishes it (x86 TSO).
        self._used_idx[0] = self.used_idx
        self.pushed += 1

    def notify(self) -> None:
        """Interrupt the guest once for everything pushed since the last call.

        We signal even if the driver set VRING_AVAIL_F_NO_INTERRUPT: the flag is only a
        hint, and reading it safely after publishing used idx needs a store-load fence that
        Python cannot express. Batching keeps the cost at one interrupt per loop round.
        """
        if not self.pushed:
            return
        self.pushed = 0
        if self.call_fd is None:
            return
        try:
            os.write(self.call_fd, _EVENTFD_ONE)
        except (BlockingIOError, InterruptedError):
            pass  # the counter is saturated: the guest has an interrupt pending anyway
        except OSError as exc:
            log.warning("queue %d: cannot signal call eventfd: %s", self.index, exc)


# --- moving bytes in and out of a chain's buffers ----------------------------------------


def split_at(segments: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first `n` bytes of a buffer list (copied), and views of everything after them.

    Headers may straddle descriptors (older drivers put the 44-byte header in a
    descriptor of its own), so this works across segment boundaries.
    """
    head = bytearray()
    rest: list[memoryview] = []
    for seg in segments:
        need = n - len(head)
        if need > 0:
            head += seg[:need]
            if len(seg) > need:
                rest.append(seg[need:])
        elif len(seg):
            rest.append(seg)
    if len(head) < n:
        raise ValueError(f"buffers hold {len(head)} bytes, need {n}")
    return bytes(head), rest


def truncate(segments: list[memoryview], n: int) -> list[memoryview]:
    """Views of the first `n` bytes of a buffer list (fewer if it holds less)."""
    out: list[memoryview] = []
    for seg in segments:
        if n <= 0:
            break
        piece = seg[:n]
        out.append(piece)
        n -= len(piece)
    return out


def scatter(segments: list[memoryview], parts: list[bytes | bytearray | memoryview]) -> int:
    """Copy `parts`, one after the other, into the buffers; returns the bytes written.

    Raises ValueError if they do not fit (the caller sizes packets to the chain).
    """
    seg_i, seg_off, written = 0, 0, 0
    for part in parts:
        data = memoryview(part).cast("B") if not isinstance(part, memoryview) else part
        pos = 0
        while pos < len(data):
            if seg_i >= len(segments):
                raise ValueError("data does not fit in the buffers")
            seg = segments[seg_i]
            room = len(seg) - seg_off
            if room <= 0:
                seg_i, seg_off = seg_i + 1, 0
                continue
            take = min(room, len(data) - pos)
            seg[seg_off: seg_off + take] = data[pos: pos + take]
            seg_off += take
            pos += take
            written += take
    return written
