"""Per-connection state and virtio-vsock credit accounting, free of any I/O.

A connection joins a guest stream socket (guest_cid:guest_port) to a host unix socket;
the host end is CID 2, port `host_port`. The backend does the socket and ring work and
asks this module what the protocol allows.

Credit, in both directions, is the virtio-vsock scheme: each side advertises in every
packet header how much it can buffer (buf_alloc) and how many bytes it has passed on to
its application so far (fwd_cnt, free-running u32). A sender may have at most
peer.buf_alloc - (tx_cnt - peer.fwd_cnt) bytes outstanding. We only count bytes as
forwarded once the host socket has taken them, so a slow host reader throttles exactly
its own guest sender and nobody else.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import Iterator

from .packet import HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, Op, VsockHeader

U32 = 0xFFFFFFFF

DEFAULT_BUF_ALLOC = 256 * 1024


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST sent, waiting for the guest
    ESTABLISHED = "established"
    CLOSING = "closing"  # gone on the guest side; still flushing bytes to the host socket
    CLOSED = "closed"


@dataclass(eq=False)
class Connection:
    guest_cid: int
    guest_port: int
    host_port: int
    host_initiated: bool
    state: State = State.CONNECTING
    buf_alloc: int = DEFAULT_BUF_ALLOC
    # guest -> host: what we received, what the host socket took, what we last told the guest
    rx_cnt: int = 0
    fwd_cnt: int = 0
    advertised_fwd_cnt: int = 0
    # host -> guest: what we sent, and the guest's latest credit information
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    credit_requested: bool = False
    # half-close bookkeeping
    peer_shut_send: bool = False  # the guest will send no more
    peer_shut_rcv: bool = False  # the guest will receive no more
    host_eof: bool = False  # the host socket reached EOF
    shutdown_sent: bool = False  # we told the guest (SHUTDOWN SEND) about host_eof
    host_write_shut: bool = False  # we did shutdown(SHUT_WR) on the host socket
    # bytes on their way: guest->host not yet taken by the host socket, host->guest not
    # yet placed in rx buffers
    to_host: bytearray = field(default_factory=bytearray)
    to_guest: bytes | memoryview = b""
    # the host end; the backend does all I/O on it
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    # --- headers ---------------------------------------------------------------------------

    def header(self, op: int, length: int = 0, flags: int = 0) -> VsockHeader:
        """A host->guest header carrying our current credit (which counts as advertised)."""
        self.advertised_fwd_cnt = self.fwd_cnt
        return VsockHeader(
            src_cid=HOST_CID, dst_cid=self.guest_cid,
            src_port=self.host_port, dst_port=self.guest_port,
            len=length, op=op, flags=flags,
            buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt,
        )

    # --- credit: host -> guest ---------------------------------------------------------------

    def update_peer_credit(self, hdr: VsockHeader) -> None:
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        self.credit_requested = False

    def peer_credit(self) -> int:
        """Bytes we may still send to the guest before it has to forward some."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def on_sent_to_guest(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32

    # --- credit: guest -> host ---------------------------------------------------------------

    def on_guest_data(self, n: int) -> bool:
        """Count `n` bytes received from the guest; False if it overran the credit we gave."""
        self.rx_cnt = (self.rx_cnt + n) & U32
        return self.buffered_from_guest() <= self.buf_alloc

    def buffered_from_guest(self) -> int:
        """Bytes received from the guest and not yet taken by the host socket."""
        return (self.rx_cnt - self.fwd_cnt) & U32

    def on_forwarded(self, n: int) -> None:
        """The host socket took `n` more bytes of guest data."""
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def credit_update_due(self) -> bool:
        """Whether the guest should hear about our fwd_cnt now.

        Once a quarter of the window has been forwarded unannounced, tell the guest: with
        at most buf_alloc/4 unannounced, the guest always sees at least 3/4 of the window
        free once our buffer drains, so it never waits on an update that will not come.
        """
        if self.state is not State.ESTABLISHED or self.peer_shut_send:
            return False
        return (self.fwd_cnt - self.advertised_fwd_cnt) & U32 >= max(1, self.buf_alloc // 4)

    # --- half-close ------------------------------------------------------------------------

    def on_peer_shutdown(self, flags: int) -> None:
        if flags & SHUTDOWN_SEND:
            self.peer_shut_send = True
        if flags & SHUTDOWN_RCV:
            self.peer_shut_rcv = True
            self.to_guest = b""  # nobody will read it

    def wants_host_read(self) -> bool:
        """Whether to read the host socket now (there is room to send what we read)."""
        return (
            self.state is State.ESTABLISHED
            and not self.host_eof
            and not self.peer_shut_rcv
            and not self.to_guest
            and self.peer_credit() > 0
        )

    def shutdown_due(self) -> bool:
        """Host EOF reached and every byte before it is with the guest: send SHUTDOWN.

        Only SHUTDOWN_SEND: the host may still be reading, and a guest told RCV as well
        stops sending its reply.
        """
        return (
            self.state is State.ESTABLISHED and self.host_eof and not self.shutdown_sent
            and not self.to_guest
        )

    def host_write_shutdown_due(self) -> bool:
        """The guest sent its last byte and the host socket has it all: shut its write side."""
        return self.peer_shut_send and not self.to_host and not self.host_write_shut

    def guest_side_done(self) -> bool:
        """Nothing more can flow with the guest: both directions are finished.

        Either the guest closed both directions itself, or it shut its sending side and the
        host reached EOF (which we already passed on). The backend then resets the guest
        side (as Linux does) and lets the host socket drain.
        """
        if self.state is not State.ESTABLISHED:
            return False
        if self.peer_shut_send and self.peer_shut_rcv:
            return True
        return self.peer_shut_send and self.shutdown_sent

    def host_side_done(self) -> bool:
        """The host socket has nothing more to do (close it)."""
        return self.state is State.CLOSING and not self.to_host


class ConnectionTable:
    """Connections by (host_port, guest_port), and the allocator for host-side ports."""

    # Host-initiated connections take local ports from here up, clear of the low ports
    # guest services and host listeners use.
    FIRST_EPHEMERAL = 1 << 30

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int], Connection] = {}
        self._next_port = self.FIRST_EPHEMERAL

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Connection]:
        # A snapshot: callers close connections while iterating.
        return iter(list(self._by_key.values()))

    def get(self, host_port: int, guest_port: int) -> Connection | None:
        return self._by_key.get((host_port, guest_port))

    def add(self, conn: Connection) -> None:
        if conn.key in self._by_key:
            raise KeyError(f"connection {conn.key} exists")
        self._by_key[conn.key] = conn

    def remove(self, conn: Connection) -> None:
        if self._by_key.get(conn.key) is conn:
            del self._by_key[conn.key]

    def allocate_port(self, guest_port: int) -> int:
        for _ in range(1 << 16):
            port = self._next_port
            self._next_port = port + 1 if port < U32 - 1 else self.FIRST_EPHEMERAL
            if (port, guest_port) not in self._by_key:
                return port
        raise RuntimeError("no free host port")


def rst_for(hdr: VsockHeader) -> VsockHeader:
    """The reset answering a packet nobody can take (never sent in answer to a reset)."""
    return hdr.reply(Op.RST)
