"""Splice stream sockets: a listener's connections, each joined to a freshly dialled one.

PyPI's grpcio can neither listen on nor dial AF_VSOCK, so both ends bridge: in the guest
a vsock listener is spliced to the agent's unix socket, on the host a unix socket to the
vsock transport's connect().
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

_CHUNK = 256 * 1024


def close_listener(listener: socket.socket) -> None:
    """Close a listening socket; shutdown() first wakes a thread blocked in its accept(),
    which close() alone does not."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


def first_then(conn: socket.socket, dial: Callable[[], socket.socket]) -> Callable[[], socket.socket]:
    """A dial function for a bridge: `conn`, already connected, on the first call; then
    whatever `dial` connects."""
    unused = [conn]
    lock = threading.Lock()

    def dial_next() -> socket.socket:
        with lock:
            if unused:
                return unused.pop()
        return dial()

    return dial_next


def read_line(conn: socket.socket, limit: int) -> bytes:
    """One line (with its newline) and not a byte more: what follows it belongs to others."""
    line = bytearray()
    while len(line) < limit and not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if n == 0:
                break
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        # Pass the EOF on (half-close) so the peer can still answer.
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SocketBridge:
    """Accept on `listener`; splice each connection with the socket `dial()` returns."""

    def __init__(self, listener: socket.socket, dial: Callable[[], socket.socket], name: str):
        self._listener = listener
        self._dial = dial
        self._name = name
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def start(self) -> "SocketBridge":
        threading.Thread(target=self._accept_loop, name=f"{self._name}-accept", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            peer = self._dial()
        except Exception:  # noqa: BLE001 - any dial failure (OSError, a transport's own error)
            # Closing tells the client at once, instead of leaving its call hanging.
            conn.close()
            return
        self._join(conn, peer)

    def splice(self, conn: socket.socket, peer: socket.socket) -> None:
        """Join two sockets connected elsewhere, in the background, until either side ends;
        close() ends them too."""
        threading.Thread(target=self._join, args=(conn, peer), name=f"{self._name}-conn", daemon=True).start()

    def _join(self, conn: socket.socket, peer: socket.socket) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                peer.close()
                return
            self._sockets.update((conn, peer))
        back = threading.Thread(target=_pump, args=(peer, conn), daemon=True)
        back.start()
        _pump(conn, peer)
        back.join()
        with self._lock:
            self._sockets.difference_update((conn, peer))
        conn.close()
        peer.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        close_listener(self._listener)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
