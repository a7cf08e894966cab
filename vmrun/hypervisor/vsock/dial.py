"""Connecting to a guest's vsock port from any host process, by the transport's address.

An address is "hybrid:<path>" (our vhost-user backend's host socket: "CONNECT <port>\\n",
then "OK <port>\\n") or "vsock:<cid>" (kernel vhost-vsock: AF_VSOCK). A transport names
its own (`VsockTransport.address`), and processes other than the sandbox's, such as the
shims, dial with it: no bridge in between. Standard library only: the shims import it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from vmrun.errors import VsockError

_OK_LINE_MAX = 64
# In a sandbox's directory: its transport's address, for the pod's other host processes.
ADDRESS_FILE = "vsock-address"


def record_address(sandbox_dir: Path, address: str) -> None:
    path = sandbox_dir / ADDRESS_FILE
    staged = path.with_name(f".{ADDRESS_FILE}.{os.getpid()}")
    staged.write_text(address)
    os.chmod(staged, 0o600)
    os.replace(staged, path)


def recorded_address(sandbox_dir: str | Path) -> str:
    try:
        return (Path(sandbox_dir) / ADDRESS_FILE).read_text().strip()
    except OSError as exc:
        raise VsockError(f"vsock: the sandbox at {sandbox_dir} records no transport: {exc.strerror or exc}") from None


def dial(address: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A connected stream socket to guest `port` through the transport at `address`."""
    scheme, _, where = address.partition(":")
    if scheme == "hybrid" and where:
        return _dial_hybrid(where, port, timeout)
    if scheme == "vsock" and where.isdigit():
        return _dial_kernel(int(where), port, timeout)
    raise VsockError(f"vsock: not a transport address: {address!r}")


def _dial_hybrid(uds_path: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(uds_path)
        except OSError as exc:
            raise VsockError(f"vsock: cannot reach the backend at {uds_path}: {exc.strerror or exc}") from exc
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            # One byte at a time: whatever follows the line is the guest's data.
            byte = sock.recv(1)
            if not byte:
                raise VsockError(f"vsock: guest refused the connection to port {port} "
                                 f"(nothing listening, or the guest is not up)")
            line += byte
            if len(line) > _OK_LINE_MAX:
                raise VsockError(f"vsock: bad handshake reply {line[:_OK_LINE_MAX]!r}")
        if not line.startswith(b"OK "):
            raise VsockError(f"vsock: bad handshake reply {line.strip()!r}")
        sock.settimeout(None)
        return sock
    except TimeoutError as exc:
        sock.close()
        raise VsockError(f"vsock: connecting to guest port {port} timed out after {timeout:g}s") from exc
    except VsockError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise VsockError(f"vsock: connecting to guest port {port} failed: {exc.strerror or exc}") from exc


def _dial_kernel(cid: int, port: int, timeout: float) -> socket.socket:
    where = f"vsock: connecting to {cid}:{port}"
    sock: socket.socket | None = None
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((cid, port))
        sock.settimeout(None)
        return sock
    except TimeoutError as exc:
        if sock is not None:
            sock.close()
        raise VsockError(f"{where} timed out after {timeout:g}s") from exc
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise VsockError(f"{where} failed: {exc.strerror or exc}") from exc
