"""Kernel vsock: QEMU's vhost-vsock-pci device served by the host kernel's vhost_vsock.

The host talks AF_VSOCK directly: connect to (guest_cid, port), and the guest reaches a
host listener bound to (VMADDR_CID_ANY, port) as CID 2. Nothing to start, and nothing to
clean up but our listening sockets.
"""

from __future__ import annotations

import socket

from vmrun.errors import VsockError
from vmrun.hypervisor.devices import QemuDevice
from vmrun.hypervisor.vsock.base import VsockTransport


class KernelVsock(VsockTransport):
    def __init__(self, guest_cid: int, device_id: str = "vsock0") -> None:
        self.guest_cid = guest_cid
        self.device_id = device_id  # for a QMP device_add / device_del
        self._listeners: list[socket.socket] = []

    def launch(self) -> None:
        pass  # the kernel is the backend; QEMU opens /dev/vhost-vsock itself

    def device(self) -> QemuDevice:
        return QemuDevice("vhost-vsock-pci", self.device_id, {"guest-cid": self.guest_cid})

    @property
    def address(self) -> str:
        return f"vsock:{self.guest_cid}"

    def listen(self, port: int) -> socket.socket:
        sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(128)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise VsockError(f"vsock: cannot listen on port {port}: {exc.strerror or exc}") from exc
        self._listeners.append(sock)
        return sock

    def is_guest(self, peer_address: object) -> bool:
        # Host ports are shared by every guest of the host: any of them may connect.
        return isinstance(peer_address, tuple) and bool(peer_address) and peer_address[0] == self.guest_cid

    def close(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
