"""A hostile guest kernel floods the vsock backend: the backend's memory and log stay bounded.

The backend process is the real one, started as the sandbox starts it (HybridVsock, its
log file included); this test plays QEMU's vhost-user front-end and a guest driver that
writes whatever it likes on the rings (tests/vsock_frontend.py). No guest is booted.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from vmrun.hypervisor.vsock.hybrid import HybridVsock
from vmrun.hypervisor.vsock.vhost_user.packet import SHUTDOWN_BOTH, Op, VsockHeader
from vsock_frontend import CID, NUM, TX_SLOT, WAIT, FakeGuest

# Seconds per flood phase: long enough for an unbounded queue to show (the backend takes
# a few hundred thousand packets a second here), short enough for a test.
PHASE_SECONDS = 3.0
# The backend process's peak RSS under the flood (and its growth from before), and its log
# file's size afterwards. A bounded backend stays far below; an unbounded one grows by
# megabytes a second.
RSS_LIMIT_KIB = 40 * 1024
RSS_GROWTH_LIMIT_KIB = 12 * 1024
LOG_LIMIT_BYTES = 64 * 1024

LISTENING = 700  # a host port whose listener accepts and never reads
CHURN = 701  # a host port whose listener accepts nothing (its backlog fills)
SILENT = 702  # a host port nobody listens on


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} for pid {pid}")


def status_kib(pid: int, field: str) -> int:
    return int(status_field(pid, field).split()[0])


def test_guest_flood_leaves_backend_memory_and_log_bounded(tmp_path):
    transport = HybridVsock(tmp_path, CID)
    guest: FakeGuest | None = None
    sockets: list[socket.socket] = []
    try:
        transport.start()
        guest = FakeGuest(transport.socket_path)
        guest.realize()
        guest.start()
        guest.post_rx()
        pid = transport.backend_pid
        listener = transport.listen(LISTENING)
        listener.settimeout(WAIT)
        sockets += [listener, transport.listen(CHURN)]

        # A few established connections, their host side never reading.
        for port in range(5000, 5004):
            guest.send(guest.pkt(Op.REQUEST, port, LISTENING))
            guest.expect(Op.RESPONSE, dst_port=port)
            sockets.append(listener.accept()[0])
        time.sleep(0.2)
        rss_before = status_kib(pid, "VmRSS")

        def pkt(op: int, src: int, dst: int, **kw: int) -> VsockHeader:
            return guest.pkt(op, src, dst, **kw)

        # 1. No rx buffer ever: every reply the backend owes has to wait.
        taken = [guest.flood([(pkt(Op.CREDIT_REQUEST, 5000, LISTENING), 0)], PHASE_SECONDS,
                             refill_rx=False)]
        # 2. rx buffers recycled as fast as the backend fills them: connection requests
        #    nobody answers, requests churning against a listener that accepts nothing
        #    more, and every op on connections that do not exist.
        churn = [(pkt(Op.REQUEST, 6000 + i, CHURN), 0) for i in range(8)]
        churn += [(pkt(Op.REQUEST, 7000 + i, SILENT), 0) for i in range(8)]
        churn += [(pkt(op, 8000 + i, 9000 + i, flags=SHUTDOWN_BOTH), 0)
                  for i, op in enumerate([Op.RESPONSE, Op.RST, Op.SHUTDOWN, Op.CREDIT_UPDATE,
                                          Op.CREDIT_REQUEST, Op.RW, Op.INVALID] * 2)]
        churn += [(pkt(Op.CREDIT_REQUEST, 5000, LISTENING), 0)] * 8
        taken.append(guest.flood(churn, PHASE_SECONDS, refill_rx=True))
        # 3. Data the host never reads, far beyond the credit advertised.
        data = [(pkt(Op.RW, port, LISTENING), TX_SLOT) for port in range(5000, 5004)]
        taken.append(guest.flood(data, PHASE_SECONDS, refill_rx=True))

        assert not status_field(pid, "State").startswith("Z"), "the backend died"
        peak = status_kib(pid, "VmHWM")
        rss_after = status_kib(pid, "VmRSS")
        log_size = transport.log_path.stat().st_size
        print(f"\nbackend pid {pid}: packets taken per phase {taken}; VmRSS {rss_before} KiB "
              f"before, {rss_after} KiB after, peak {peak} KiB; log {log_size} bytes")

        assert peak < RSS_LIMIT_KIB, f"backend peak RSS {peak} KiB under a guest flood"
        assert peak - rss_before < RSS_GROWTH_LIMIT_KIB, (
            f"backend RSS grew from {rss_before} to {peak} KiB under a guest flood")
        assert log_size < LOG_LIMIT_BYTES, f"backend log grew to {log_size} bytes"
        assert sum(taken) > 10 * NUM, "the flood never reached the backend"

        # Overrunning the credit reset each connection: its host socket was closed.
        for held in sockets[2:]:
            held.settimeout(WAIT)
            while held.recv(1 << 20):
                pass

        # Still serving once the guest behaves: a new connection is answered.
        guest.resync()
        guest.send(guest.pkt(Op.REQUEST, 4321, SILENT))
        deadline = time.monotonic() + WAIT
        while not any(h.op == Op.RST and h.dst_port == 4321 for h, _ in guest.poll(0.2)):
            assert time.monotonic() < deadline, "the backend no longer answers the guest"
    finally:
        if guest is not None:
            guest.close()
        for sock in sockets:
            sock.close()
        transport.close()
