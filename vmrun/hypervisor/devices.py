"""A QEMU device described once, for the command line of a booting guest and for QMP
hot-plug into a clone restored from a template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class QMPTarget(Protocol):
    def qmp(self, command: str, **arguments: object) -> object: ...


class FdQMPTarget(QMPTarget, Protocol):
    def add_fd(self, fd: int, name: str) -> None: ...


@dataclass(frozen=True)
class QemuDevice:
    driver: str
    id: str
    properties: dict[str, str | int] = field(default_factory=dict)
    # The unix socket of the device's vhost-user backend, reached through a chardev.
    backend_socket: Path | None = None

    @property
    def chardev_id(self) -> str:
        return f"{self.id}-chr"

    def _all_properties(self) -> dict[str, str | int]:
        extra = {"chardev": self.chardev_id} if self.backend_socket else {}
        return {"id": self.id, **extra, **self.properties}

    def command_line(self) -> list[str]:
        args = []
        if self.backend_socket:
            args += ["-chardev", f"socket,id={self.chardev_id},path={self.backend_socket}"]
        props = ",".join(f"{k}={v}" for k, v in self._all_properties().items())
        return args + ["-device", f"{self.driver},{props}"]

    def hotplug(self, vm: QMPTarget, bus: str) -> None:
        """Add the device to a running (or paused) guest on PCIe root port `bus`."""
        if self.backend_socket:
            vm.qmp("chardev-add", id=self.chardev_id, backend={
                "type": "socket",
                "data": {"addr": {"type": "unix", "data": {"path": str(self.backend_socket)}}, "server": False},
            })
        vm.qmp("device_add", driver=self.driver, bus=bus, **self._all_properties())


@dataclass(frozen=True)
class TapNic:
    """A virtio-net NIC on a tap that we opened (QEMU gets the fd, never the tap's name:
    the tap lives in the pod's network namespace, QEMU in ours)."""

    id: str
    mac: str

    @property
    def netdev_id(self) -> str:
        return f"{self.id}-net"

    def hotplug(self, vm: FdQMPTarget, bus: str, tap_fd: int) -> None:
        netdev = self.netdev_id
        vm.add_fd(tap_fd, netdev)
        vm.qmp("netdev_add", type="tap", id=netdev, fd=netdev)
        vm.qmp("device_add", driver="virtio-net-pci", id=self.id, bus=bus, netdev=netdev, mac=self.mac)
