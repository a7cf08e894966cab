"""The vhost-user control plane on its own: message handling without an event loop."""

import os

import pytest

from vmrun.hypervisor.vsock.vhost_user import protocol as proto
from vmrun.hypervisor.vsock.vhost_user.device import VhostUserDevice
from vmrun.hypervisor.vsock.vhost_user.protocol import Message, ProtocolError, Request


class Recorder:
    def __init__(self) -> None:
        self.kicks: list[tuple[int, int | None]] = []
        self.resets = 0

    def watch(self, q, fd):
        # the old fd is unwatched while it is still open
        if fd is None:
            assert q.kick_fd is not None
            os.fstat(q.kick_fd)
        self.kicks.append((q.index, fd))

    def reset(self):
        self.resets += 1


@pytest.fixture
def dev():
    rec = Recorder()
    d = VhostUserDevice(b"\x07" + bytes(7), rec.watch, rec.reset)
    yield d, rec
    d.reset()


def msg(request, payload=b"", fds=()):
    return Message(request, proto.VERSION, payload, list(fds))


def test_feature_replies_and_masks(dev):
    d, _ = dev
    assert d.handle(msg(Request.GET_FEATURES)) == proto.u64_payload(0x1_4000_0000)
    assert d.handle(msg(Request.GET_PROTOCOL_FEATURES)) == proto.u64_payload(0x200)
    assert d.handle(msg(Request.SET_PROTOCOL_FEATURES, proto.u64_payload(0xFFFF))) is None
    assert d.protocol_features == 0x200  # only what we offered sticks
    d.handle(msg(Request.SET_FEATURES, proto.u64_payload((1 << 29) | (1 << 32))))
    assert d.features == 1 << 32


def test_kick_fd_replacement_is_announced_in_order(dev):
    d, rec = dev
    a, b = os.eventfd(0), os.eventfd(0)
    d.handle(msg(Request.SET_VRING_KICK, proto.u64_payload(1), [a]))
    d.handle(msg(Request.SET_VRING_KICK, proto.u64_payload(1), [b]))
    assert rec.kicks == [(1, a), (1, None), (1, b)]
    with pytest.raises(OSError):
        os.fstat(a)  # the replaced fd is closed
    assert d.queues[1].started
    reply = d.handle(msg(Request.GET_VRING_BASE, proto.vring_state_payload(1, 0)))
    assert reply == proto.vring_state_payload(1, 0)
    assert rec.kicks[-1] == (1, None) and not d.queues[1].started


def test_err_fd_is_closed_and_bad_queue_index_refused(dev):
    d, _ = dev
    r, w = os.pipe()
    d.handle(msg(Request.SET_VRING_ERR, proto.u64_payload(0), [w]))
    with pytest.raises(OSError):
        os.fstat(w)
    os.close(r)
    fd = os.eventfd(0)
    with pytest.raises(ProtocolError):
        d.handle(msg(Request.SET_VRING_CALL, proto.u64_payload(2), [fd]))
    with pytest.raises(OSError):
        os.fstat(fd)  # not leaked
    with pytest.raises(ProtocolError):
        d.handle(msg(Request.SET_VRING_NUM, proto.vring_state_payload(5, 128)))


def test_nofd_flag_takes_no_fd(dev):
    d, rec = dev
    d.handle(msg(Request.SET_VRING_CALL, proto.u64_payload(0 | proto.VRING_NOFD_MASK)))
    assert d.queues[0].call_fd is None
    d.handle(msg(Request.SET_VRING_KICK, proto.u64_payload(0 | proto.VRING_NOFD_MASK)))
    assert d.queues[0].kick_fd is None and rec.kicks == []


def test_config_and_enable_and_reset(dev):
    d, rec = dev
    reply = d.handle(msg(Request.GET_CONFIG, proto.encode_config(0, 8, 0, bytes(8))))
    assert reply[12:] == b"\x07" + bytes(7)
    d.handle(msg(Request.SET_VRING_ENABLE, proto.vring_state_payload(0, 1)))
    assert d.queues[0].enabled
    d.handle(msg(Request.RESET_OWNER))
    assert rec.resets == 1 and not d.queues[0].enabled and d.features == 0
