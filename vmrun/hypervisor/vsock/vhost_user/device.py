"""The device as QEMU drives it over vhost-user: features, guest memory, the two rings.

This is the control plane only: it answers QEMU's messages and keeps the ring and memory
state the data path (backend.py) works on. It never touches vsock connections, except to
ask the backend to drop them all when QEMU resets the device.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from . import protocol as proto
from .memory import GuestMemory
from .protocol import Request
from .virtqueue import Virtqueue

log = logging.getLogger(__name__)

RX, TX = 0, 1  # QEMU keeps the event queue (2) for itself

# What QEMU 7.2's vhost-user-vsock needs to realize: VERSION_1 + protocol features, and of
# those only CONFIG (it reads the guest CID from us). Nothing else is offered: no event
# idx, no indirect descriptors, no packed ring, no REPLY_ACK, no MQ.
FEATURES = (1 << proto.VIRTIO_F_VERSION_1) | (1 << proto.VHOST_USER_F_PROTOCOL_FEATURES)
PROTOCOL_FEATURES = 1 << proto.VHOST_USER_PROTOCOL_F_CONFIG

# Requests QEMU waits for an answer to (REPLY_ACK aside, which we do not offer).
REPLYING_REQUESTS = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_CONFIG, Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS,
})

KickWatcher = Callable[[Virtqueue, int | None], None]


class VhostUserDevice:
    """Device state plus the handler for each front-end message.

    `watch_kick(queue, fd)` is called whenever a ring's kick eventfd changes (fd None: no
    longer watched), before the old fd is closed, so the event loop can (un)register it.
    `on_reset()` is called when the device is reset and every connection must go.
    """

    def __init__(self, config_space: bytes, watch_kick: KickWatcher,
                 on_reset: Callable[[], None]) -> None:
        self.config_space = config_space
        self.queues = [Virtqueue(RX), Virtqueue(TX)]
        self.memory = GuestMemory()
        self.features = 0
        self.protocol_features = 0
        self._watch_kick = watch_kick
        self._on_reset = on_reset

    def handle(self, msg: proto.Message) -> bytes | None:
        """Act on one message; the reply payload, or None if it takes no reply.

        Raises ProtocolError, RingError or GuestMemoryError for a message that cannot be
        applied; the caller decides how to answer (see REPLYING_REQUESTS).
        """
        req = msg.request
        log.debug("vhost-user %s size=%d fds=%d", proto.request_name(req), len(msg.payload),
                  len(msg.fds))
        if req == Request.GET_FEATURES:
            return proto.u64_payload(FEATURES)
        if req == Request.SET_FEATURES:
            self.features = msg.u64() & FEATURES
        elif req == Request.GET_PROTOCOL_FEATURES:
            return proto.u64_payload(PROTOCOL_FEATURES)
        elif req == Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = msg.u64() & PROTOCOL_FEATURES
        elif req == Request.SET_OWNER:
            pass
        elif req in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self.reset()
        elif req == Request.SET_MEM_TABLE:
            self._set_mem_table(msg)
        elif req == Request.SET_VRING_NUM:
            index, num = msg.vring_state()
            self.queue(index).set_num(num)
        elif req == Request.SET_VRING_ADDR:
            addr = proto.parse_vring_addr(msg.payload)
            self.queue(addr.index).set_addr(
                addr.desc_user_addr, addr.used_user_addr, addr.avail_user_addr)
        elif req == Request.SET_VRING_BASE:
            index, num = msg.vring_state()
            self.queue(index).set_base(num)
        elif req == Request.GET_VRING_BASE:
            return self._get_vring_base(msg)
        elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            self._set_vring_fd(msg)
        elif req == Request.SET_VRING_ENABLE:
            index, num = msg.vring_state()
            self.queue(index).enabled = bool(num)
        elif req == Request.GET_CONFIG:
            return proto.read_config(self.config_space, proto.parse_config(msg.payload))
        elif req == Request.SET_CONFIG:
            log.warning("ignoring a write to the read-only vsock config space")
        elif req == Request.GET_QUEUE_NUM:
            return proto.u64_payload(len(self.queues))
        elif req == Request.GET_MAX_MEM_SLOTS:
            return proto.u64_payload(proto.MAX_FDS)
        else:
            # Everything else belongs to features we did not offer.
            log.warning("ignoring unsupported vhost-user request %s", proto.request_name(req))
        # NEED_REPLY is only honoured with REPLY_ACK, which we never offer.
        return None

    def queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise proto.ProtocolError(f"no queue {index} (the backend has rx=0 and tx=1)")
        return self.queues[index]

    def reset(self) -> None:
        """Forget the guest: connections, rings and memory."""
        self._on_reset()
        for q in self.queues:
            if q.kick_fd is not None:
                self._watch_kick(q, None)
            q.reset()
        self.memory.close()
        self.memory = GuestMemory()
        self.features = self.protocol_features = 0

    def _set_mem_table(self, msg: proto.Message) -> None:
        descs = proto.parse_mem_table(msg.payload)
        fds, msg.fds = msg.fds, []
        memory = GuestMemory.from_table(descs, fds)
        old, self.memory = self.memory, memory
        for q in self.queues:
            q.set_memory(memory)  # rings re-translate their addresses lazily
        old.close()
        log.info("guest memory: %s", ", ".join(
            f"gpa {r.guest_phys_addr:#x}+{r.size:#x}" for r in memory.regions))

    def _get_vring_base(self, msg: proto.Message) -> bytes:
        # Stops the ring; the answer is where to resume (SET_VRING_BASE on the next start).
        index, _ = msg.vring_state()
        base = 0
        if 0 <= index < len(self.queues):
            q = self.queues[index]
            if q.kick_fd is not None:
                self._watch_kick(q, None)
            base = q.stop()
        return proto.vring_state_payload(index, base)

    def _set_vring_fd(self, msg: proto.Message) -> None:
        value = msg.u64()
        index = value & proto.VRING_INDEX_MASK
        fd = None if value & proto.VRING_NOFD_MASK else msg.take_fd()
        if msg.request == Request.SET_VRING_ERR or not 0 <= index < len(self.queues):
            if fd is not None:
                os.close(fd)  # we never report ring errors that way
            if msg.request != Request.SET_VRING_ERR:
                raise proto.ProtocolError(f"no queue {index}")
            return
        q = self.queues[index]
        if msg.request == Request.SET_VRING_CALL:
            q.set_call_fd(fd)  # QEMU resends it often: the newest one wins
            return
        if fd is None:
            log.warning("queue %d: no kick fd (polling is not supported)", index)
        if q.kick_fd is not None:
            self._watch_kick(q, None)
        q.set_kick_fd(fd)
        if fd is not None:
            self._watch_kick(q, fd)
