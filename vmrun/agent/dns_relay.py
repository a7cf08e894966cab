"""The guest's side of the DNS relay (vmrun/common/dns_relay.py): UDP DNS on the loopback
addresses the host names, each query relayed to the host over vsock.

The host connects when the pod's name server is a loopback address in its namespace on
the host (dockerd's 127.0.0.11); a new connection replaces the one before (its
addresses too). Queries wait for their answer at most _PENDING_LIMIT at a time: the
oldest is forgotten first, as a lost UDP packet would be.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections import OrderedDict

from vmrun.common.dns_relay import DNS_PORT, MAX_MESSAGE, FrameError, FrameReader, frame, parse_hello, query_tag

_HOST_CID = 2
_PENDING_LIMIT = 256


class _Session:
    """One host connection: its UDP sockets and the queries awaiting answers."""

    def __init__(self, conn: socket.socket, addresses: list[str]):
        self.conn = conn
        self.sockets: list[socket.socket] = []
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((address, DNS_PORT))
            self.sockets.append(udp)
        self.pending: OrderedDict[int, tuple[socket.socket, object]] = OrderedDict()
        self.next_serial = 0
        self.reader = FrameReader()

    def close(self) -> None:
        for sock in (*self.sockets, self.conn):
            sock.close()

    def query_from(self, udp: socket.socket) -> None:
        """Relay a query that arrived on `udp`; an OSError only if the host's stream broke."""
        try:
            message, client = udp.recvfrom(MAX_MESSAGE + 1)
        except OSError:
            return  # a client's error, not the relay's
        if not message or len(message) > MAX_MESSAGE:
            return
        tag = query_tag(self.sockets.index(udp), self.next_serial)
        self.next_serial = (self.next_serial + 1) & 0xFFFFFF
        self.pending[tag] = (udp, client)
        if len(self.pending) > _PENDING_LIMIT:
            self.pending.popitem(last=False)
        self.conn.sendall(frame(tag, message))

    def answers(self, data: bytes) -> None:
        for tag, message in self.reader.feed(data):
            waiting = self.pending.pop(tag, None)
            if waiting is not None:
                udp, client = waiting
                with contextlib.suppress(OSError):
                    udp.sendto(message, client)


class DnsRelayGuest:
    def __init__(self, listener: socket.socket, log=print):
        self._listener = listener
        self._log = log
        self._session: _Session | None = None

    def start(self) -> DnsRelayGuest:
        threading.Thread(target=self._serve, name="dns-relay", daemon=True).start()
        return self

    def _accept(self) -> None:
        conn, (cid, _) = self._listener.accept()
        if cid != _HOST_CID:
            conn.close()  # only the host opens the relay
            return
        try:
            conn.settimeout(5)
            reader = FrameReader()
            frames: list[tuple[int, bytes]] = []
            while not frames:
                data = conn.recv(4096)
                if not data:
                    raise OSError("closed before its hello")
                frames = reader.feed(data)
            conn.settimeout(None)
            session = _Session(conn, parse_hello(frames[0][1]))
        except (OSError, UnicodeDecodeError, FrameError) as exc:
            self._log(f"dns relay: refused a connection: {exc}")
            conn.close()
            return
        if self._session is not None:
            self._session.close()
        self._session = session

    def _serve(self) -> None:
        while True:
            session = self._session
            readable = [self._listener, *(session.sockets if session else ()), *((session.conn,) if session else ())]
            ready, _, _ = select.select(readable, [], [])
            for sock in ready:
                if sock is self._listener:
                    self._accept()
                    break  # the session may have changed
                assert session is not None
                try:
                    if sock is session.conn:
                        data = sock.recv(65536)
                        if not data:
                            raise OSError("the host closed the relay")
                        session.answers(data)
                    else:
                        session.query_from(sock)
                except (OSError, FrameError) as exc:
                    self._log(f"dns relay: {exc}")
                    session.close()
                    self._session = None
                    break
