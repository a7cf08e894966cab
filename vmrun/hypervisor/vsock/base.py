"""The vsock transport interface: one guest's vsock device and the host's way to reach it.

Two implementations stand behind it: the kernel's vhost-vsock (where /dev/vhost-vsock
exists) and our own userspace vhost-user backend speaking hybrid vsock on the host side.
The rest of vmrun only sees this interface.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod

from vmrun.hypervisor.devices import QemuDevice


class VsockTransport(ABC):
    """A vsock device for one guest.

    Life cycle: `start()` before QEMU is launched (a backend must be listening before QEMU
    connects to it), `qemu_args()` on QEMU's command line, then `connect()` / `listen()`
    while the guest runs, and `close()` after QEMU has exited. Also a context manager.
    """

    guest_cid: int

    def start(self) -> None:
        """Start whatever host-side helper the device needs, and wait until it serves."""
        self.launch()
        self.wait_started()

    @abstractmethod
    def launch(self) -> None:
        """Start the host-side helper without waiting for it (work can overlap its start)."""

    def wait_started(self) -> None:
        """Wait until what `launch()` started serves (a backend QEMU can connect to)."""

    @abstractmethod
    def device(self) -> QemuDevice:
        """The vsock device, for QEMU's command line or a QMP hot-plug."""

    def qemu_args(self) -> list[str]:
        """QEMU command-line arguments that add the vsock device."""
        return self.device().command_line()

    @property
    @abstractmethod
    def address(self) -> str:
        """How any host process reaches the guest's ports (vsock/dial.py)."""

    def connect(self, port: int, timeout: float = 5.0) -> socket.socket:
        """A connected stream socket to `port` in the guest (host-initiated)."""
        from vmrun.hypervisor.vsock.dial import dial

        return dial(self.address, port, timeout)

    @abstractmethod
    def listen(self, port: int) -> socket.socket:
        """A listening socket that accepts the guest's connections to host `port`.

        Call it before the guest connects: a guest connection to a port nobody listens on
        is reset.
        """

    def is_guest(self, peer_address: object) -> bool:
        """Whether a connection accepted on a `listen()` socket, from `peer_address`, comes
        from this transport's guest. True where only its guest can reach the listener (a
        backend of its own, behind a socket in a directory only root and it can reach)."""
        return True

    def alive(self) -> bool:
        """Whether the transport's helper process, if it has one, still runs."""
        return True

    def signal_stop(self) -> None:
        """Ask this transport's helper processes, if any, to stop; close() reaps them."""

    @abstractmethod
    def close(self) -> None:
        """Stop helpers and remove every socket file this transport made."""

    def __enter__(self) -> "VsockTransport":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
