"""A pod's network carried into one running guest: a NIC hot-plugged per pod interface,
configured by the agent; interfaces come and go while the guest runs (`vmrun network`)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from vmrun.errors import NetworkError
from vmrun.hypervisor.devices import FdQMPTarget, TapNic
from vmrun.network.scan import PodInterface
from vmrun.network.tcfilter import PodNetwork, TapEndpoint

_UNPLUG_TIMEOUT = 20.0


class InterfaceAgent(Protocol):
    def configure_interface(self, interface: PodInterface) -> object: ...
    def remove_interface(self, mac: str) -> None: ...


@dataclass
class AttachedNic:
    endpoint: TapEndpoint
    nic: TapNic
    port: str
    guest_name: str


class NetworkAttachment:
    """NICs for the interfaces of the pod namespace `netns_path`, on the guest's free PCIe
    ports; `close()` removes what vmrun made in the namespace (the guest goes anyway)."""

    def __init__(self, vm: FdQMPTarget, agent: InterfaceAgent, netns_path: str, model: str, ports: list[str]):
        self.netns_path = netns_path
        self._vm = vm
        self._agent = agent
        self._network = PodNetwork(netns_path, model)
        self._free_ports = list(ports)
        self._nics: list[AttachedNic] = []
        self._nics_made = 0
        self._lock = threading.Lock()

    def sync(self) -> list[str]:
        """The guest's NICs made to match the namespace now: a NIC for each veth set up that
        has none, and out with those whose veth went (`docker network disconnect`)."""
        present = self._network.veth_indexes()
        for attached in [a for a in self._nics if a.endpoint.interface.index not in present]:
            self.remove(attached.endpoint.interface.name)
        return self.add_new(only_up=True)

    def add_new(self, only_up: bool = False) -> list[str]:
        """A NIC for each pod interface that has none yet; the guest's names for them."""
        with self._lock:
            names = []
            for endpoint in self._network.add_new(only_up):
                try:
                    names.append(self._plug(endpoint).guest_name)
                except BaseException:
                    self._network.remove(endpoint)
                    raise
            return names

    def _plug(self, endpoint: TapEndpoint) -> AttachedNic:
        if not self._free_ports:
            raise NetworkError(f"no free PCIe port in the guest for {endpoint.interface.name}")
        port = self._free_ports.pop(0)
        nic = TapNic(f"nic{self._nics_made}", endpoint.interface.mac)
        self._nics_made += 1
        try:
            nic.hotplug(self._vm, port, endpoint.tap_fd)
        except BaseException:
            self._free_ports.insert(0, port)
            raise
        self._network.release_tap(endpoint)  # QEMU holds the tap now
        attached = AttachedNic(endpoint, nic, port, endpoint.interface.name)
        try:
            configured = self._agent.configure_interface(endpoint.interface)
        except BaseException:
            with contextlib.suppress(Exception):  # the agent's error is the one to report
                self._unplug(attached)
            self._free_ports.insert(0, port)
            raise
        self._nics.append(attached)
        attached.guest_name = getattr(configured, "name", "") or attached.guest_name
        return attached

    def remove(self, name: str) -> None:
        """Take the interface `name` (the pod's name for it) out of the guest."""
        with self._lock:
            attached = next((a for a in self._nics if name in (a.guest_name, a.endpoint.interface.name)), None)
            if attached is None:
                raise NetworkError(f"the guest has no pod interface {name!r}")
            self._agent.remove_interface(attached.endpoint.interface.mac)
            self._unplug(attached)
            self._nics.remove(attached)
            self._network.remove(attached.endpoint)
            self._free_ports.append(attached.port)

    def _unplug(self, attached: AttachedNic) -> None:
        self._vm.qmp("device_del", id=attached.nic.id)
        # The guest ejects the device in its own time; the netdev goes once it has.
        deadline = time.monotonic() + _UNPLUG_TIMEOUT
        while attached.nic.id in {entry["name"] for entry in self._vm.qmp("qom-list", path="/machine/peripheral")}:
            if time.monotonic() > deadline:
                raise NetworkError(f"the guest did not release {attached.guest_name} within {_UNPLUG_TIMEOUT:g}s")
            time.sleep(0.05)
        self._vm.qmp("netdev_del", id=attached.nic.netdev_id)

    def interfaces(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"name": a.guest_name, "mac": a.endpoint.interface.mac, "tap": a.endpoint.tap_name,
                     "addresses": [f"{x.address}/{x.prefix_len}" for x in a.endpoint.interface.addresses]}
                    for a in self._nics]

    def close(self) -> None:
        with self._lock:
            self._network.close()
            self._nics.clear()
