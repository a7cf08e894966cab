"""The backend end to end, against a fake QEMU + guest driver (tests/vsock_frontend.py)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from vmrun.hypervisor.vsock.vhost_user import backend as backend_module
from vmrun.hypervisor.vsock.vhost_user.backend import MAX_QUEUED_REPLIES, VsockBackend
from vmrun.hypervisor.vsock.vhost_user.packet import (
    HEADER_SIZE, SHUTDOWN_BOTH, SHUTDOWN_SEND, Op,
)
from vmrun.hypervisor.vsock.vhost_user.protocol import Request
from vmrun.hypervisor.vsock.vhost_user.virtqueue import VRING_DESC_F_WRITE
from vsock_frontend import CID, NUM, RAM, RX_BUF, TX_SLOT, WAIT, FakeGuest


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


def test_a_guest_taking_no_replies_stalls_its_own_tx_not_our_memory(env):
    backend, guest, tmp = env
    ls = host_listen(tmp, 720)
    guest.send(guest.pkt(Op.REQUEST, 7000, 720))
    guest.expect(Op.RESPONSE, dst_port=7000)
    # Credit requests, each owed a reply, and no rx buffer ever again past the NUM posted.
    taken = guest.flood([(guest.pkt(Op.CREDIT_REQUEST, 7000, 720), 0)], 0.5, refill_rx=False)
    assert eventually(lambda: backend._tx_stalled)
    assert len(backend.ctrl) <= MAX_QUEUED_REPLIES
    assert taken <= MAX_QUEUED_REPLIES + 2 * NUM
    assert guest.tx.used_idx() != guest.tx.avail_idx  # the rest waits in the guest's ring
    # Once the guest takes its replies the backend reads tx again, to the last packet.
    guest.resync()
    assert eventually(lambda: not backend._tx_stalled and not backend.ctrl)
    host, _ = ls.accept()
    host.settimeout(WAIT)
    guest.send(guest.pkt(Op.RW, 7000, 720), b"still here")
    assert read_exactly(host, 10) == b"still here"
    ls.close()


def test_connections_per_guest_are_capped(env, monkeypatch):
    backend, guest, tmp = env
    monkeypatch.setattr(backend_module, "MAX_CONNECTIONS", 3)
    ls = host_listen(tmp, 721)
    for port in (1, 2, 3):
        guest.send(guest.pkt(Op.REQUEST, port, 721))
        guest.expect(Op.RESPONSE, dst_port=port)
    guest.send(guest.pkt(Op.REQUEST, 4, 721))
    guest.expect(Op.RST, dst_port=4)
    host = host_connect(tmp, 87)  # the host's connections count too: closed unanswered
    assert host.recv(100) == b""
    host.close()
    assert len(backend.conns) == 3
    guest.send(guest.pkt(Op.RST, 1, 721))  # one goes: room for another
    guest.send(guest.pkt(Op.REQUEST, 5, 721))
    guest.expect(Op.RESPONSE, dst_port=5)
    ls.close()


def _fill_within_credit(backend, guest, host_port: int, guest_port: int, chunk: bytes) -> int:
    """Send data the host never reads, never past our credit, until the backend holds a
    window's worth or resets the connection; the bytes sent."""
    conn = backend.conns.get(host_port, guest_port)
    sent = 0
    while backend.conns.get(host_port, guest_port) is conn:
        assert eventually(lambda: conn.rx_cnt == sent or conn.sock is None)
        if conn.buffered_from_guest() + len(chunk) > conn.buf_alloc:
            return sent
        guest.send(guest.pkt(Op.RW, guest_port, host_port), chunk)
        sent += len(chunk)
    return sent


def test_guest_data_held_for_host_sockets_is_bounded_in_total(env, monkeypatch):
    backend, guest, tmp = env
    monkeypatch.setattr(backend_module, "MAX_BUFFERED_TO_HOST", 96 * 1024)
    ls = host_listen(tmp, 722)
    held = []
    for port in (8000, 8001):
        guest.send(guest.pkt(Op.REQUEST, port, 722))
        guest.expect(Op.RESPONSE, dst_port=port)
        held.append(ls.accept()[0])  # never read
    chunk = b"d" * 8192
    sent = _fill_within_credit(backend, guest, 722, 8000, chunk)
    first = backend.conns.get(722, 8000)
    assert first is not None and len(first.to_host) > 96 * 1024 - first.buf_alloc
    # The second connection stays within its own credit, but not within the total.
    _fill_within_credit(backend, guest, 722, 8001, chunk)
    guest.expect(Op.RST, dst_port=8001)
    assert backend.conns.get(722, 8001) is None
    assert backend.conns.get(722, 8000) is first
    assert eventually(lambda: backend.to_host_bytes == len(first.to_host))
    # The host reads: the budget is given back. (Counted here: the backend's buffer
    # empties in its own thread, possibly after we read its last bytes.)
    held[0].settimeout(WAIT)
    received = 0
    while received < sent:
        received += len(held[0].recv(1 << 20))
    assert eventually(lambda: backend.to_host_bytes == 0)
    for s in held:
        s.close()
    ls.close()


def test_host_connections_yet_to_say_connect_are_capped(env, monkeypatch):
    backend, guest, tmp = env
    monkeypatch.setattr(backend_module, "MAX_PENDING_HOSTS", 2)
    quiet = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    for s in quiet[:2]:
        s.settimeout(WAIT)
        s.connect(str(tmp / "vsock.sock"))
    assert eventually(lambda: len(backend.pending_hosts) == 2)
    quiet[2].settimeout(WAIT)
    quiet[2].connect(str(tmp / "vsock.sock"))
    assert quiet[2].recv(10) == b""
    quiet[0].sendall(b"CONNECT 88\n")
    guest.expect(Op.REQUEST, dst_port=88)
    for s in quiet:
        s.close()


def test_connection_churn_logs_nothing_at_info(env, caplog):
    caplog.set_level(logging.INFO)
    backend, guest, tmp = env
    ls = host_listen(tmp, 723)
    guest.send(guest.pkt(Op.REQUEST, 8999, 724))
    guest.expect(Op.RST, dst_port=8999)
    caplog.clear()  # the device's start-up (guest memory) is logged, once
    for i in range(10):
        guest.send(guest.pkt(Op.REQUEST, 9000 + i, 723))
        guest.expect(Op.RESPONSE, dst_port=9000 + i)
        ls.accept()[0].close()
        guest.send(guest.pkt(Op.RST, 9000 + i, 723))
        guest.send(guest.pkt(Op.REQUEST, 9100 + i, 724))  # nobody listens
        guest.expect(Op.RST, dst_port=9100 + i)
        host = host_connect(tmp, 89)
        req, _ = guest.expect(Op.REQUEST, dst_port=89)
        guest.send(guest.pkt(Op.RST, 89, req.src_port))
        assert host.recv(10) == b""
        host.close()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("vmrun.")]
    ls.close()


def test_malformed_tx_chains_do_not_stop_the_backend(env):
    _, guest, tmp = env
    guest.send_raw_chain([(RAM - 10, 44, 0)])  # header beyond guest RAM
    guest.send_raw_chain([(guest.tx_bufs, 20, 0)])  # shorter than a header
    guest.send_raw_chain([(guest.tx_bufs, 44, VRING_DESC_F_WRITE)])  # no readable part
    guest.send(guest.pkt(Op.REQUEST, 4000, 706))
    guest.expect(Op.RST, dst_port=4000)  # still serving


def test_a_broken_ring_stops_the_backend_with_a_failure(tmp_path, caplog):
    """Streams on a queue that cannot go on would wait for ever: the backend ends instead
    (and the sandbox, watching it, ends the guest)."""
    backend = VsockBackend(tmp_path / "vhost.sock", tmp_path / "vsock.sock", CID)
    thread = threading.Thread(target=backend.run, daemon=True)
    thread.start()
    guest = FakeGuest(tmp_path / "vhost.sock")
    try:
        guest.realize()
        guest.start()
        guest.tx.offer(NUM)  # a head beyond the table: no id to return it under
        os.eventfd_write(guest.kick[1], 1)
        thread.join(WAIT)
        assert not thread.is_alive() and backend.failed
        assert "the guest's vsock cannot go on" in caplog.text
    finally:
        guest.close()
        backend.stop()
        thread.join(WAIT)


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
