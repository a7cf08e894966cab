"""Hybrid vsock: the guest's vsock reached through unix sockets, via our vhost-user backend.

Used where /dev/vhost-vsock is unavailable. The backend process serves QEMU's
`vhost-user-vsock-pci` device; on the host, a connection to the guest is a unix socket to
`uds_path` that first says "CONNECT <port>\\n" and gets "OK <host port>\\n" back, and the
guest's connections to host port P arrive on the unix socket `<uds_path>_P`.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from vmrun.errors import CommandError, VsockError
from vmrun.hypervisor.devices import QemuDevice
from vmrun.hypervisor.vsock.base import VsockTransport
from vmrun.proc import HelperProcess, stdlib_module_command

START_TIMEOUT = 5.0
_OK_LINE_MAX = 64


class HybridVsock(VsockTransport):
    def __init__(self, run_dir: Path, guest_cid: int, device_id: str = "vsock0") -> None:
        self.run_dir = Path(run_dir)
        self.guest_cid = guest_cid
        self.device_id = device_id  # for QMP device_add / device_del
        # What QEMU needs (also for a QMP chardev-add/device_add hotplug):
        self.socket_path = self.run_dir / "vhost-user-vsock.sock"
        # The host's side of the guest's vsock:
        self.uds_path = self.run_dir / "vsock.sock"
        self.log_path = self.run_dir / "vsock-backend.log"
        self._helper: HelperProcess | None = None
        self._listeners: dict[int, socket.socket] = {}

    def port_path(self, port: int) -> Path:
        """Where the guest's connections to host `port` arrive."""
        return Path(f"{self.uds_path}_{port}")

    # --- VsockTransport --------------------------------------------------------------------

    def launch(self) -> None:
        if self._helper is not None and self._helper.alive():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.socket_path, self.uds_path):
            path.unlink(missing_ok=True)
        argv, env = stdlib_module_command("vmrun.hypervisor.vsock.vhost_user", "--socket", str(self.socket_path),
                                          "--uds", str(self.uds_path), "--cid", str(self.guest_cid))
        helper = HelperProcess(name="vsock backend", argv=argv, env=env, log_path=self.log_path)
        try:
            helper.start()
        except CommandError as exc:
            raise VsockError(str(exc)) from exc
        self._helper = helper

    def wait_started(self) -> None:
        helper = self._helper
        if helper is None:
            raise VsockError("vsock: the backend was not launched")
        # The backend makes its socket path appear only once it is listening.
        try:
            helper.wait_for_path(self.socket_path, START_TIMEOUT)
        except CommandError as exc:
            self._helper = None
            helper.stop()
            raise VsockError(str(exc)) from None

    def device(self) -> QemuDevice:
        return QemuDevice("vhost-user-vsock-pci", self.device_id, backend_socket=self.socket_path)

    def connect(self, port: int, timeout: float = 5.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.uds_path))
            except OSError as exc:
                raise VsockError(
                    f"vsock: cannot reach the backend at {self.uds_path}: "
                    f"{exc.strerror or exc}") from exc
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                # One byte at a time: whatever follows the line is the guest's data.
                byte = sock.recv(1)
                if not byte:
                    raise VsockError(
                        f"vsock: guest refused the connection to port {port} "
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
            raise VsockError(
                f"vsock: connecting to guest port {port} timed out after {timeout:g}s") from exc
        except VsockError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise VsockError(
                f"vsock: connecting to guest port {port} failed: {exc.strerror or exc}"
            ) from exc

    def listen(self, port: int) -> socket.socket:
        if port in self._listeners:
            raise VsockError(f"vsock: already listening on host port {port}")
        path = self.port_path(port)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise VsockError(f"vsock: cannot listen on {path}: {exc.strerror or exc}") from exc
        self._listeners[port] = sock
        return sock

    def signal_stop(self) -> None:
        if self._helper is not None:
            self._helper.signal_stop()

    def close(self) -> None:
        if self._helper is not None:
            self._helper.stop()
            self._helper = None
        for port, sock in self._listeners.items():
            sock.close()
            self.port_path(port).unlink(missing_ok=True)
        self._listeners.clear()
        for path in (self.socket_path, self.uds_path):
            path.unlink(missing_ok=True)

