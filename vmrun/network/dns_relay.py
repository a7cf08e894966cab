"""The host's side of the DNS relay (vmrun/common/dns_relay.py): queries the guest relays
are asked of the pod's loopback name servers from inside the container's host network
namespace, where they listen (dockerd's embedded DNS at 127.0.0.11).

Everything the guest sends is untrusted: a query goes only to the addresses the host chose
(from the spec's resolv.conf), as one UDP datagram of at most MAX_MESSAGE bytes; at most
_PENDING_LIMIT queries wait for an answer, each _ANSWER_TIMEOUT seconds at most; the DNS
message id is the host's own while a query is out (the guest's is put back in its answer),
so an answer is matched to its query by id and by the server it came from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import select
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from vmrun.common.dns_relay import (DNS_PORT, MAX_MESSAGE, RELAY_PORT, FrameError, FrameReader, address_index,
                                    frame, hello)
from vmrun.hypervisor.vsock.base import VsockTransport
from vmrun.network.netns import run_in_netns

log = logging.getLogger("vmrun.dns_relay")

_PENDING_LIMIT = 256
_ANSWER_TIMEOUT = 5.0
_NAMESERVER = re.compile(r"^\s*nameserver\s+(\S+)", re.MULTILINE)


def loopback_nameservers(spec: dict) -> list[str]:
    """The loopback name servers of the resolv.conf the caller mounts into the container:
    the ones only its own network namespace on the host can reach."""
    for mount in spec.get("mounts") or []:
        if isinstance(mount, dict) and mount.get("destination") == "/etc/resolv.conf" and mount.get("source"):
            try:
                text = Path(mount["source"]).read_text(errors="replace")[:65536]
            except OSError:
                return []
            found = []
            for address in _NAMESERVER.findall(text):
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(address).is_loopback and address not in found:
                        found.append(address)
            return found
    return []


@dataclass
class _Query:
    tag: int
    guest_id: bytes
    server: tuple[str, int]
    deadline: float


class DnsRelayHost:
    """Relays the guest's queries while open; close() stops it. Start it once the
    container's namespace has its name server (after the create-time hooks)."""

    def __init__(self, transport: VsockTransport, netns_path: str, addresses: list[str]):
        self._addresses = list(addresses)
        # Sockets made in the namespace stay in it, whichever thread uses them.
        self._udp = {family: run_in_netns(netns_path, lambda f=family: socket.socket(f, socket.SOCK_DGRAM))
                     for family in {socket.AF_INET6 if ":" in a else socket.AF_INET for a in addresses}}
        try:
            self._conn = transport.connect(RELAY_PORT)
            self._conn.sendall(hello(self._addresses))
        except BaseException:
            for udp in self._udp.values():
                udp.close()
            raise
        self._pending: OrderedDict[int, _Query] = OrderedDict()
        self._next_id = 0
        self._stop_read, self._stop_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="dns-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop_write.send(b"x")
        self._thread.join(10)
        for sock in (self._conn, self._stop_read, self._stop_write, *self._udp.values()):
            sock.close()

    def _serve(self) -> None:
        reader = FrameReader()
        sockets = [self._conn, self._stop_read, *self._udp.values()]
        while True:
            ready, _, _ = select.select(sockets, [], [], 1.0)
            self._expire()
            for sock in ready:
                if sock is self._stop_read:
                    return
                if sock is self._conn:
                    try:
                        data = sock.recv(65536)
                        if not data:
                            return  # the guest went
                        for tag, message in reader.feed(data):
                            self._ask(tag, message)
                    except (OSError, FrameError) as exc:
                        log.warning("DNS relay: the guest's stream broke: %s", exc)
                        return
                else:
                    self._answer(sock)

    def _ask(self, tag: int, message: bytes) -> None:
        if len(message) < 12 or address_index(tag) >= len(self._addresses):
            return  # shorter than a DNS header, or for no address of ours
        address = self._addresses[address_index(tag)]
        self._next_id = (self._next_id + 1) & 0xFFFF
        while self._next_id in self._pending:  # ids still out are not reused
            self._next_id = (self._next_id + 1) & 0xFFFF
        query = _Query(tag, message[:2], (address, DNS_PORT), time.monotonic() + _ANSWER_TIMEOUT)
        self._pending[self._next_id] = query
        if len(self._pending) > _PENDING_LIMIT:
            self._pending.popitem(last=False)
        udp = self._udp[socket.AF_INET6 if ":" in address else socket.AF_INET]
        with contextlib.suppress(OSError):
            udp.sendto(self._next_id.to_bytes(2, "big") + message[2:], query.server)

    def _answer(self, udp: socket.socket) -> None:
        try:
            message, server = udp.recvfrom(MAX_MESSAGE + 1)
        except OSError:
            return
        if len(message) < 12 or len(message) > MAX_MESSAGE:
            return
        query = self._pending.get(int.from_bytes(message[:2], "big"))
        if query is None or (server[0], server[1]) != query.server:
            return  # no query of ours, or not from the server asked
        del self._pending[int.from_bytes(message[:2], "big")]
        with contextlib.suppress(OSError):
            self._conn.sendall(frame(query.tag, query.guest_id + message[2:]))

    def _expire(self) -> None:
        now = time.monotonic()
        for host_id in [i for i, q in self._pending.items() if q.deadline < now]:
            del self._pending[host_id]
