"""The DNS relay's wire format, shared by the host (vmrun/network/dns_relay.py) and the
agent (vmrun/agent/dns_relay.py).

Some callers give a container a name server on the loopback of its own network namespace:
dockerd's embedded DNS answers at 127.0.0.11 there (it listens inside the namespace, and
its iptables rules redirect port 53 to it). In the guest, that address is the guest's own
loopback. So the agent answers UDP DNS on it and relays each query over vsock to the host,
which asks the name server from inside the container's host namespace.

One vsock stream, opened by the host to RELAY_PORT. Every message is a frame: a 2-byte
big-endian length of what follows, a 4-byte tag, the payload. The host's first frame (tag
0) names the addresses to answer on, space-separated. After it, the guest sends queries
(its tag, the DNS message) and the host sends back answers with the tag of their query.
A query's tag says which address it was sent to: its top byte is that address's index.
"""

from __future__ import annotations

import socket
import struct

RELAY_PORT = 1025
DNS_PORT = 53
# A DNS message over UDP with EDNS(0) is at most what the client advertises; 4096 is what
# resolvers commonly offer. Anything longer is no UDP DNS message: dropped.
MAX_MESSAGE = 4096
_HEADER = struct.Struct(">HI")
MAX_FRAME = _HEADER.size - 2 + MAX_MESSAGE  # what the length counts


class FrameError(Exception):
    """The peer broke the framing: the stream cannot be read any further."""


def frame(tag: int, payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"a relayed message holds at most {MAX_MESSAGE} bytes")
    return _HEADER.pack(len(payload) + 4, tag) + payload


class FrameReader:
    """Frames out of a stream read in pieces: feed() what arrived, take the whole frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, tag = _HEADER.unpack_from(self._buffer)
            if length < 4 or length > MAX_FRAME:
                raise FrameError(f"a frame of {length} bytes")
            if len(self._buffer) < 2 + length:
                break
            frames.append((tag, bytes(self._buffer[_HEADER.size:2 + length])))
            del self._buffer[:2 + length]
        return frames


def query_tag(address_index: int, serial: int) -> int:
    return (address_index << 24) | (serial & 0xFFFFFF)


def address_index(tag: int) -> int:
    return tag >> 24


def hello(addresses: list[str]) -> bytes:
    return frame(0, " ".join(addresses).encode())


def parse_hello(payload: bytes) -> list[str]:
    """The addresses of a hello, each checked to be an IPv4 or IPv6 address."""
    addresses = payload.decode("ascii", errors="strict").split()
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        socket.inet_pton(family, address)  # OSError if it is not one
    return addresses
