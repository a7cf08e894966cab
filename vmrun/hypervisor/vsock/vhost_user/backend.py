"""The backend's event loop: QEMU's vhost-user socket, the two rings, and the host sockets.

One thread, one selector. Each round handles the ready fds, then services the rings:
  tx (queue 1, guest -> host): pop packets, write payloads to the host sockets;
  rx (queue 0, host -> guest): control packets first, then data staged from host sockets;
and finally signals each ring's call eventfd once for everything pushed in the round
(interrupts are expensive under TCG, so one per round rather than one per packet).

Host side, "hybrid vsock" (the Firecracker convention):
  * host -> guest: connect to `uds`, send "CONNECT <port>\\n"; once the guest accepts we
    answer "OK <host port>\\n" and the socket carries the stream. If the guest resets
    (nobody listening), the host socket is closed without a reply.
  * guest -> host CID 2 port P: we connect to the unix socket `<uds>_P`; if nobody listens
    there, the guest's connect is reset.

The guest is not trusted: whatever it can make us hold is bounded (the limits below). A
guest that does not take its replies stops being read; one that breaks the protocol on a
connection loses that connection. What it can trigger again and again is logged at debug
level, or through _guest_fault, which thins it out (and logs.py rate-limits every line).
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import select
import selectors
import socket
import struct
from pathlib import Path
from typing import Callable

from . import protocol as proto
from .connections import DEFAULT_BUF_ALLOC, Connection, ConnectionTable, State, rst_for
from .device import REPLYING_REQUESTS, RX, TX, VhostUserDevice
from .memory import GuestMemoryError
from .packet import (
    HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, VSOCK_TYPE_STREAM, Op, PacketError,
    VsockHeader,
)
from .virtqueue import DescChain, RingError, Virtqueue, scatter, split_at, truncate

log = logging.getLogger(__name__)

HOST_READ_CHUNK = 64 * 1024  # one host read per connection per round
TX_BUDGET = 512  # packets per round, so one busy guest sender cannot starve the loop
CONNECT_LINE_MAX = 64
QEMU_MESSAGE_TIMEOUT = 5.0

# --- what one guest can make us hold -----------------------------------------------------
# Control packets owed to the guest (replies, resets, credit updates) waiting for rx
# buffers. At this many we stop reading tx until the guest takes some, as Linux's
# vhost-vsock does: each tx packet owes at most one reply, so a guest that never posts rx
# buffers stalls its own sending instead of growing the queue. Twice the rx ring QEMU
# gives the device (128): a guest that keeps its rx ring stocked stays well below it.
MAX_QUEUED_REPLIES = 256
# Connections, both directions, counting those still flushing to the host after the guest
# closed. Each holds a host socket, guest data up to its credit (and MAX_BUFFERED_TO_HOST
# for all) and at most HOST_READ_CHUNK of host data (16 MiB for all). vmrun needs one per
# container or exec shim plus a few of its own: this leaves a busy pod ample room.
MAX_CONNECTIONS = 256
# Guest bytes held for host sockets that are not reading, all connections together.
# Credit bounds each connection to buf_alloc (256 KiB); this bounds the sum far below
# MAX_CONNECTIONS windows (64 MiB) yet allows 32 full ones. The connection whose data
# would go past it is reset.
MAX_BUFFERED_TO_HOST = 8 * 1024 * 1024
# Host connections that have not sent their CONNECT line yet (the listener's backlog is
# 128 more): a client sends it at once, so these are few.
MAX_PENDING_HOSTS = 64


def _listen_unix(path: Path, backlog: int) -> socket.socket:
    """A listening unix socket that appears at `path` only once it accepts connections.

    Binding under a temporary name and renaming makes the path's existence mean
    "listening", which is what the transport waits for.
    """
    tmp = path.with_name(f"{path.name}.tmp")  # short: unix socket paths max out at 107 bytes
    for p in (tmp, path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(tmp))
        sock.listen(backlog)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    sock.setblocking(False)
    return sock


class VsockBackend:
    """A vhost-user-vsock device backend for one guest.

    The listening sockets exist as soon as the object does; `run()` serves until `stop()`
    (e.g. from a signal handler) or until QEMU disconnects, then cleans up.
    """

    def __init__(
        self, socket_path: Path, uds_path: Path, guest_cid: int,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        listeners: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        """`listeners`: the host's and QEMU's listening sockets, made by whoever started us
        (at `uds_path` and `socket_path`, which stay theirs); else made here, and removed
        on close."""
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"invalid guest CID {guest_cid}")
        self.socket_path = Path(socket_path)
        self.uds_path = Path(uds_path)
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.sel = selectors.DefaultSelector()
        self.device = VhostUserDevice(struct.pack("<Q", guest_cid), self._watch_kick,
                                      self._drop_connections)
        self.conns = ConnectionTable()
        self.closing: set[Connection] = set()  # guest side gone, flushing to the host
        self.masks: dict[Connection, int] = {}  # registered selector interest per host socket
        # CONNECTING host sockets not to poll until the guest answers (early data, half-close)
        self.hold_read: set[Connection] = set()
        self.ctrl: collections.deque[VsockHeader] = collections.deque()
        self.pending_hosts: dict[socket.socket, bytearray] = {}  # waiting for CONNECT lines
        self.to_host_bytes = 0  # sum of every connection's to_host (MAX_BUFFERED_TO_HOST)
        self._tx_stalled = False  # tx left unread: MAX_QUEUED_REPLIES replies are waiting
        self.qemu: socket.socket | None = None
        self._stopping = False
        self.failed = False  # stopped because a queue broke (_ring_broken)
        self._more_work = False
        self._faults = 0
        self._accept_paused = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.sel.register(self._wakeup_r, selectors.EVENT_READ, self._on_wakeup)
        # Where the host's port P listens: <uds>_P (reached through a directory fd once the
        # process may no longer walk the path to it: see __main__.py).
        self.port_prefix = f"{self.uds_path}_"
        self._owns_paths = listeners is None
        if listeners is not None:
            self.host_listener, self.qemu_listener = listeners
            for listener in listeners:
                listener.setblocking(False)
        else:
            # The host listener first, the vhost-user socket last: when the latter appears,
            # everything is ready.
            self.host_listener = _listen_unix(self.uds_path, 128)
            try:
                self.qemu_listener = _listen_unix(self.socket_path, 1)
            except BaseException:
                self.host_listener.close()
                self._unlink(self.uds_path)
                raise
        self.sel.register(self.host_listener, selectors.EVENT_READ, self._on_host_accept)
        self.sel.register(self.qemu_listener, selectors.EVENT_READ, self._on_qemu_accept)

    # --- life cycle ------------------------------------------------------------------------

    @property
    def wakeup_fd(self) -> int:
        """Write end for signal.set_wakeup_fd: a signal then interrupts select()."""
        return self._wakeup_w.fileno()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass

    def run(self) -> None:
        try:
            while not self._stopping:
                events = self.sel.select(0 if self._more_work else None)
                self._more_work = False
                for key, mask in events:
                    callback: Callable[[int], None] = key.data
                    try:
                        callback(mask)
                    except Exception:  # a bug must not take every connection down
                        log.exception("internal error handling fd %d", key.fd)
                    if self._stopping:
                        break
                if not self._stopping:
                    self._service()
        finally:
            self.close()

    def close(self) -> None:
        self.device.reset()
        if self.qemu is not None:
            self._drop_qemu()
        for sock in (self.host_listener, self.qemu_listener):
            self._unregister(sock)
            sock.close()
        if self._owns_paths:
            self._unlink(self.socket_path)
            self._unlink(self.uds_path)
        self._unregister(self._wakeup_r)
        self._wakeup_r.close()
        self._wakeup_w.close()
        self.sel.close()

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _unregister(self, fileobj: socket.socket | int) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _on_wakeup(self, mask: int) -> None:
        try:
            while self._wakeup_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # --- vhost-user: the QEMU side ---------------------------------------------------------

    def _on_qemu_accept(self, mask: int) -> None:
        try:
            sock, _ = self.qemu_listener.accept()
        except BlockingIOError:
            return
        if self.qemu is not None:
            log.warning("refusing a second vhost-user front-end")
            sock.close()
            return
        # Messages are read whole and blocking (QEMU sends each in one go and waits for
        # our replies); the timeout only guards against a front-end wedged mid-message.
        sock.setblocking(True)
        sock.settimeout(QEMU_MESSAGE_TIMEOUT)
        self.qemu = sock
        self.sel.register(sock, selectors.EVENT_READ, self._on_qemu_message)
        log.info("vhost-user front-end connected")

    def _on_qemu_message(self, mask: int) -> None:
        assert self.qemu is not None
        try:
            msg = proto.recv_message(self.qemu)
        except proto.Disconnected:
            log.info("vhost-user front-end disconnected")
            self._qemu_gone()
            return
        except (proto.ProtocolError, OSError) as exc:
            log.error("vhost-user: %s; dropping the front-end", exc)
            self._qemu_gone()
            return
        try:
            reply = self.device.handle(msg)
            if reply is not None:
                self._reply(msg, reply)
        except (proto.ProtocolError, RingError, GuestMemoryError) as exc:
            log.error("vhost-user %s: %s", proto.request_name(msg.request), exc)
            if msg.request in REPLYING_REQUESTS:
                # An empty reply fails the request in QEMU instead of leaving it waiting.
                self._reply(msg, b"")
        except OSError as exc:
            log.error("vhost-user %s: %s; dropping the front-end",
                      proto.request_name(msg.request), exc)
            self._qemu_gone()
        finally:
            msg.close_fds()
        self._more_work = True

    def _ring_broken(self, exc: RingError) -> None:
        """A queue that cannot go on leaves every stream in the guest stuck for good: end,
        so that the guest ends with us (the sandbox watches its helpers) and whoever waits
        on a stream gets an error at once, not a hang."""
        log.error("%s; the guest's vsock cannot go on: stopping", exc)
        self.failed = True
        self._stopping = True

    def _qemu_gone(self) -> None:
        self._drop_qemu()
        self.device.reset()
        # One front-end per backend: when it leaves, the guest is gone.
        self._stopping = True

    def _drop_qemu(self) -> None:
        if self.qemu is not None:
            self._unregister(self.qemu)
            self.qemu.close()
            self.qemu = None

    def _reply(self, msg: proto.Message, payload: bytes) -> None:
        assert self.qemu is not None
        proto.send_message(self.qemu, proto.encode_reply(msg.request, payload))

    def _watch_kick(self, q: Virtqueue, fd: int | None) -> None:
        if fd is None:
            if q.kick_fd is not None:
                self._unregister(q.kick_fd)
        else:
            self.sel.register(fd, selectors.EVENT_READ, functools.partial(self._on_kick, q))

    def _on_kick(self, q: Virtqueue, mask: int) -> None:
        q.drain_kick()
        self._more_work = True  # the round's service step looks at the ring

    def _drop_connections(self) -> None:
        """The device was reset (or QEMU left): every connection goes, host sockets close."""
        for conn in list(self.conns) + list(self.closing):
            self._close_host(conn)
        self.conns = ConnectionTable()
        self.closing.clear()
        self.hold_read.clear()
        for sock in list(self.pending_hosts):
            self._drop_pending_host(sock)
        self.ctrl.clear()
        self._tx_stalled = False

    # --- the service round -------------------------------------------------------------------

    def _service(self) -> None:
        self._process_queues()
        if self._tx_stalled and len(self.ctrl) < MAX_QUEUED_REPLIES:
            # The guest took replies: read tx again (it will not kick for what it queued).
            self._tx_stalled = False
            self._more_work = True
        self._refresh_interest()
        for q in self.device.queues:
            q.notify()

    def _process_queues(self) -> None:
        self._process_tx()
        for conn in list(self.conns) + list(self.closing):
            self._advance(conn)
        self._process_rx()

    # --- guest -> host ---------------------------------------------------------------------

    def _process_tx(self) -> None:
        q = self.device.queues[TX]
        budget = TX_BUDGET
        try:
            while budget > 0:
                if len(self.ctrl) >= MAX_QUEUED_REPLIES:
                    self._tx_stalled = True  # until the guest takes replies off rx
                    return
                chain = q.pop()
                if chain is None:
                    return
                budget -= 1
                try:
                    self._handle_tx_chain(chain)
                except Exception:  # guest input must never take the loop down
                    log.exception("tx: internal error; packet dropped")
                finally:
                    # Everything we keep has been copied: the buffer goes back at once.
                    q.push(chain.head, 0)
            self._more_work = True
        except RingError as exc:
            self._ring_broken(exc)

    def _handle_tx_chain(self, chain: DescChain) -> None:
        if chain.error:
            self._guest_fault("tx: dropping a malformed descriptor chain: %s", chain.error)
            return
        try:
            raw, payload = split_at(chain.readable, HEADER_SIZE)
            hdr = VsockHeader.unpack(raw)
        except (ValueError, PacketError):
            self._guest_fault("tx: dropping a packet shorter than its header")
            return
        if hdr.len > sum(len(p) for p in payload):
            self._guest_fault("tx: dropping %s: payload larger than its buffers", hdr.describe())
            return
        self._handle_packet(hdr, truncate(payload, hdr.len))

    def _handle_packet(self, hdr: VsockHeader, payload: list[memoryview]) -> None:
        if hdr.src_cid != self.guest_cid:
            self._guest_fault("tx: dropping a packet with a spoofed source CID: %s", hdr.describe())
            return
        if hdr.dst_cid != HOST_CID or hdr.type != VSOCK_TYPE_STREAM:
            self._reject(hdr)
            return
        op = hdr.op
        conn = self.conns.get(hdr.dst_port, hdr.src_port)
        if conn is None:
            if op == Op.REQUEST:
                self._guest_connect(hdr)
            else:
                self._reject(hdr)
            return
        if op == Op.RST:
            log.debug("guest reset %s", conn.key)
            self._guest_gone(conn)
            return
        conn.update_peer_credit(hdr)
        if op == Op.RW:
            if conn.state is not State.ESTABLISHED or conn.peer_shut_send:
                self._reset(conn, "data outside an open stream", fault=True)
            else:
                self._to_host(conn, payload)
        elif op == Op.RESPONSE:
            if conn.state is State.CONNECTING:
                self._host_connected(conn)
            else:
                self._reset(conn, "unexpected RESPONSE", fault=True)
        elif op == Op.CREDIT_UPDATE:
            pass  # the credit is all it carries
        elif op == Op.CREDIT_REQUEST:
            if conn.state is State.ESTABLISHED:
                self._send(conn.header(Op.CREDIT_UPDATE))
        elif op == Op.SHUTDOWN:
            conn.on_peer_shutdown(hdr.flags)
            if hdr.flags & SHUTDOWN_RCV and conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        else:
            self._reset(conn, f"unexpected {hdr.describe()}", fault=True)

    def _guest_fault(self, fmt: str, *args: object) -> None:
        """Log a guest mistake; a misbehaving guest must not flood the log."""
        self._faults += 1
        if self._faults <= 20 or self._faults % 1000 == 0:
            log.warning(fmt + " (guest fault #%d)", *args, self._faults)

    def _reject(self, hdr: VsockHeader) -> None:
        if hdr.op != Op.RST:
            self._send(rst_for(hdr))

    def _to_host(self, conn: Connection, payload: list[memoryview]) -> None:
        n = sum(len(p) for p in payload)
        if not n:
            return
        if not conn.on_guest_data(n):
            self._reset(conn, f"guest overran its credit ({conn.buffered_from_guest()} bytes "
                              f"buffered, buf_alloc {conn.buf_alloc})", fault=True)
            return
        sent = 0
        if not conn.to_host and conn.sock is not None:
            try:
                sent = conn.sock.sendmsg(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._reset(conn, f"host socket: {exc.strerror}")
                return
            conn.on_forwarded(sent)
        if sent < n:
            if self.to_host_bytes + n - sent > MAX_BUFFERED_TO_HOST:
                self._reset(conn, f"guest data for host sockets that do not read is over "
                                  f"{MAX_BUFFERED_TO_HOST} bytes", fault=True)
                return
            self.to_host_bytes += n - sent
            # Copy what the host socket did not take: the guest gets its buffer back now.
            for piece in payload:
                if sent >= len(piece):
                    sent -= len(piece)
                    continue
                conn.to_host += piece[sent:]
                sent = 0

    def _flush_to_host(self, conn: Connection) -> None:
        if not conn.to_host or conn.sock is None:
            return
        try:
            sent = conn.sock.send(conn.to_host)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if conn.state is State.CLOSING:
                self._discard_to_host(conn)
            else:
                self._reset(conn, f"host socket: {exc.strerror}")
            return
        del conn.to_host[:sent]
        self.to_host_bytes -= sent
        conn.on_forwarded(sent)

    def _discard_to_host(self, conn: Connection) -> None:
        self.to_host_bytes -= len(conn.to_host)
        conn.to_host.clear()

    def _connection_count(self) -> int:
        return len(self.conns) + len(self.closing)

    def _guest_connect(self, hdr: VsockHeader) -> None:
        """The guest connects to host port P: join it to the unix socket <uds>_P."""
        if self._connection_count() >= MAX_CONNECTIONS:
            self._guest_fault("guest port %d -> host port %d: %d connections already; "
                              "resetting", hdr.src_port, hdr.dst_port, MAX_CONNECTIONS)
            self._reject(hdr)
            return
        path = f"{self.port_prefix}{hdr.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.debug("guest port %d -> host port %d: %s: %s; resetting", hdr.src_port,
                      hdr.dst_port, path, exc.strerror or exc)
            self._reject(hdr)
            return
        conn = Connection(
            guest_cid=self.guest_cid, guest_port=hdr.src_port, host_port=hdr.dst_port,
            host_initiated=False, state=State.ESTABLISHED, buf_alloc=self.buf_alloc,
        )
        conn.update_peer_credit(hdr)
        conn.sock = sock
        self.conns.add(conn)
        self._send(conn.header(Op.RESPONSE))
        log.debug("guest port %d connected to host port %d", conn.guest_port, conn.host_port)

    # --- host -> guest ---------------------------------------------------------------------

    def _on_host_accept(self, mask: int) -> None:
        for _ in range(64):
            try:
                sock, _ = self.host_listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds: stop accepting (the listener would stay readable and spin)
                # until one of our sockets closes.
                log.error("accepting a host connection: %s; pausing", exc)
                self._unregister(self.host_listener)
                self._accept_paused = True
                return
            if len(self.pending_hosts) >= MAX_PENDING_HOSTS:
                log.warning("host connection: %d others have not sent CONNECT yet; closing it",
                            MAX_PENDING_HOSTS)
                sock.close()
                continue
            sock.setblocking(False)
            self.pending_hosts[sock] = bytearray()
            self.sel.register(sock, selectors.EVENT_READ,
                              functools.partial(self._on_connect_line, sock))

    def _drop_pending_host(self, sock: socket.socket) -> None:
        self.pending_hosts.pop(sock, None)
        self._unregister(sock)
        sock.close()
        self._resume_accept()

    def _resume_accept(self) -> None:
        if self._accept_paused and not self._stopping:
            self._accept_paused = False
            self.sel.register(self.host_listener, selectors.EVENT_READ, self._on_host_accept)

    def _on_connect_line(self, sock: socket.socket, mask: int) -> None:
        buf = self.pending_hosts.get(sock)
        if buf is None:
            return
        try:
            # Peek so that bytes after the newline stay in the socket for the guest.
            data = sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
            if data:
                nl = data.find(b"\n")
                data = sock.recv(nl + 1 if nl >= 0 else len(data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_pending_host(sock)
            return
        buf += data
        if not buf.endswith(b"\n"):
            if len(buf) >= CONNECT_LINE_MAX:
                log.warning("host connection: no CONNECT line in %d bytes", len(buf))
                self._drop_pending_host(sock)
            return
        del self.pending_hosts[sock]
        self._unregister(sock)
        port = _parse_connect(bytes(buf))
        if port is None:
            log.warning("host connection: bad request %r", bytes(buf[:CONNECT_LINE_MAX]))
            sock.close()
            self._resume_accept()
            return
        if self._connection_count() >= MAX_CONNECTIONS:
            # Closed without an answer, as when the guest refuses.
            log.warning("host connection to guest port %d: %d connections already; closing it",
                        port, MAX_CONNECTIONS)
            sock.close()
            self._resume_accept()
            return
        conn = Connection(
            guest_cid=self.guest_cid, guest_port=port,
            host_port=self.conns.allocate_port(port), host_initiated=True,
            state=State.CONNECTING, buf_alloc=self.buf_alloc,
        )
        conn.sock = sock
        self.conns.add(conn)
        self._send(conn.header(Op.REQUEST))
        log.debug("host connecting to guest port %d (host port %d)", port, conn.host_port)

    def _host_connected(self, conn: Connection) -> None:
        conn.state = State.ESTABLISHED
        self.hold_read.discard(conn)
        assert conn.sock is not None
        line = f"OK {conn.host_port}\n".encode()
        try:
            # A fresh socket always has room for one short line.
            if conn.sock.send(line) != len(line):
                raise BlockingIOError(errno.EAGAIN, "short write")
        except OSError as exc:
            self._reset(conn, f"host socket: {exc.strerror}")
            return
        log.debug("host connected to guest port %d", conn.guest_port)

    def _on_host_event(self, conn: Connection, mask: int) -> None:
        # The connection may have been closed earlier in this very round.
        if conn.sock is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush_to_host(conn)
        if mask & selectors.EVENT_READ and conn.sock is not None:
            if conn.state is State.CONNECTING:
                self._check_connecting(conn)
            elif conn.wants_host_read():
                self._read_host(conn)

    def _check_connecting(self, conn: Connection) -> None:
        assert conn.sock is not None
        try:
            early = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            early = b""
        if early or not _hung_up(conn.sock):
            # Early data (kept for the guest), or a mere half-close: stop polling until
            # the guest answers.
            self.hold_read.add(conn)
        else:
            self._reset(conn, "host gave up before the guest answered")

    def _read_host(self, conn: Connection) -> None:
        assert conn.sock is not None
        want = min(HOST_READ_CHUNK, conn.peer_credit())
        try:
            data = conn.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._reset(conn, f"host socket: {exc.strerror}")
            return
        if data:
            conn.to_guest = memoryview(data)
        else:
            conn.host_eof = True

    def _process_rx(self) -> None:
        q = self.device.queues[RX]
        try:
            while self.ctrl:
                chain = q.pop()
                if chain is None:
                    return
                if chain.error or chain.writable_len < HEADER_SIZE:
                    self._guest_fault("rx: dropping a bad buffer: %s", chain.error or "too small")
                    q.push(chain.head, 0)
                    continue
                hdr = self.ctrl.popleft()
                q.push(chain.head, scatter(chain.writable, [hdr.pack()]))
            for conn in self.conns:
                while conn.to_guest and conn.state is State.ESTABLISHED:
                    credit = conn.peer_credit()
                    if credit <= 0:
                        break
                    chain = q.pop()
                    if chain is None:
                        return
                    if chain.error or chain.writable_len <= HEADER_SIZE:
                        self._guest_fault("rx: dropping a bad buffer: %s", chain.error or "too small")
                        q.push(chain.head, 0)
                        continue
                    self._send_data(q, chain, conn, credit)
        except RingError as exc:
            self._ring_broken(exc)

    def _send_data(self, q: Virtqueue, chain: DescChain, conn: Connection, credit: int) -> None:
        data = conn.to_guest
        n = min(len(data), chain.writable_len - HEADER_SIZE, credit)
        hdr = conn.header(Op.RW, n)
        first = chain.writable[0]
        if len(first) >= HEADER_SIZE + n:
            # The usual case: one buffer holds header and payload.
            hdr.pack_into(first, 0)
            first[HEADER_SIZE: HEADER_SIZE + n] = data[:n]
        else:
            scatter(chain.writable, [hdr.pack(), data[:n]])
        q.push(chain.head, HEADER_SIZE + n)
        conn.on_sent_to_guest(n)
        conn.to_guest = data[n:] if n < len(data) else b""

    def _send(self, hdr: VsockHeader) -> None:
        """Queue a control packet (they go before any data in the next rx pass)."""
        self.ctrl.append(hdr)

    # --- connection state ------------------------------------------------------------------

    def _advance(self, conn: Connection) -> None:
        """Take the protocol steps a connection's state now allows."""
        if conn.state is State.ESTABLISHED:
            if conn.host_write_shutdown_due():
                conn.host_write_shut = True
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if conn.shutdown_due():
                conn.shutdown_sent = True
                self._send(conn.header(Op.SHUTDOWN, flags=SHUTDOWN_SEND))
            if conn.guest_side_done():
                self._send(conn.header(Op.RST))
                self._guest_gone(conn)
            elif conn.credit_update_due():
                self._send(conn.header(Op.CREDIT_UPDATE))
        if conn.state is State.CLOSING and conn.host_side_done():
            self._close_host(conn)

    def _guest_gone(self, conn: Connection) -> None:
        """The guest side is finished: drain what the host has yet to read, then close."""
        self.conns.remove(conn)
        self.hold_read.discard(conn)
        if conn.state is State.CONNECTING:
            log.debug("guest refused the connection to its port %d", conn.guest_port)
            self._close_host(conn)
            return
        conn.state = State.CLOSING
        conn.to_guest = b""
        if conn.to_host and conn.sock is not None:
            self.closing.add(conn)
        else:
            self._close_host(conn)

    def _reset(self, conn: Connection, why: str, fault: bool = False) -> None:
        """Abort a connection on both sides (`fault`: the guest broke the protocol)."""
        if fault:
            self._guest_fault("resetting guest port %d <-> host port %d: %s",
                              conn.guest_port, conn.host_port, why)
        else:
            log.debug("resetting guest port %d <-> host port %d: %s", conn.guest_port,
                      conn.host_port, why)
        if conn.state in (State.CONNECTING, State.ESTABLISHED):
            self._send(conn.header(Op.RST))
        self.conns.remove(conn)
        self._close_host(conn)

    def _close_host(self, conn: Connection) -> None:
        self.hold_read.discard(conn)
        self.closing.discard(conn)
        self.masks.pop(conn, None)
        conn.state = State.CLOSED
        conn.to_guest = b""
        self._discard_to_host(conn)
        if conn.sock is not None:
            self._unregister(conn.sock)
            conn.sock.close()
            conn.sock = None
            self._resume_accept()

    def _refresh_interest(self) -> None:
        for conn in list(self.conns) + list(self.closing):
            if conn.sock is None:
                continue
            mask = 0
            if conn.state is State.CONNECTING:
                if conn not in self.hold_read:
                    mask = selectors.EVENT_READ
            elif conn.wants_host_read():
                mask = selectors.EVENT_READ
            if conn.to_host:
                mask |= selectors.EVENT_WRITE
            old = self.masks.get(conn, 0)
            if mask == old:
                continue
            if not mask:
                self.sel.unregister(conn.sock)
                del self.masks[conn]
            elif not old:
                self.sel.register(conn.sock, mask, functools.partial(self._on_host_event, conn))
                self.masks[conn] = mask
            else:
                self.sel.modify(conn.sock, mask, functools.partial(self._on_host_event, conn))
                self.masks[conn] = mask


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed the socket outright (not just shut down its writing side)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def _parse_connect(line: bytes) -> int | None:
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0] != "CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None
