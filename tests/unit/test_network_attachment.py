"""NetworkAttachment's bookkeeping of NICs and PCIe ports, with QEMU, the agent and the
namespace's taps faked."""

from __future__ import annotations

import pytest

import vmrun.network.attachment as attachment
from vmrun.errors import AgentError, NetworkError
from vmrun.network.scan import IPAddress, PodInterface
from vmrun.network.tcfilter import TapEndpoint


class FakeVM:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.plugged: set[str] = set()

    def add_fd(self, fd: int, name: str) -> None:
        self.calls.append(("add_fd", {"name": name}))

    def qmp(self, command: str, **arguments: object) -> object:
        self.calls.append((command, arguments))
        if command == "device_add":
            self.plugged.add(str(arguments["id"]))
        elif command == "device_del":
            self.plugged.discard(str(arguments["id"]))  # the guest ejects it at once
        elif command == "qom-list":
            return [{"name": name} for name in self.plugged]
        return {}


class FakeAgent:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.removed: list[str] = []

    def configure_interface(self, interface: PodInterface) -> object:
        if self.fail:
            raise AgentError("agent: no network device with MAC 02:00:00:00:00:01 appeared in the guest")
        return type("Configured", (), {"name": interface.name})()

    def remove_interface(self, mac: str) -> None:
        self.removed.append(mac)


class FakePodNetwork:
    def __init__(self, netns_path: str, model: str) -> None:
        self.pending = [TapEndpoint(PodInterface("eth0", 7, "02:00:00:00:00:01", 1500,
                                                 [IPAddress("198.18.0.2", 24)]), "tap0_vmrun", 8, -1)]
        self.removed: list[TapEndpoint] = []
        self.present = {7}  # veth indexes in the namespace

    def add_new(self, only_up: bool = False) -> list[TapEndpoint]:
        made, self.pending = self.pending, []
        return made

    def veth_indexes(self) -> set[int]:
        return set(self.present)

    def release_tap(self, endpoint: TapEndpoint) -> None:
        pass

    def remove(self, endpoint: TapEndpoint) -> None:
        self.removed.append(endpoint)

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_pod_network(monkeypatch):
    monkeypatch.setattr(attachment, "PodNetwork", FakePodNetwork)


def test_plug_list_and_unplug_give_the_port_back():
    vm, agent = FakeVM(), FakeAgent()
    nics = attachment.NetworkAttachment(vm, agent, "/run/netns/pod", "tcfilter", ["hp2", "hp3"])
    assert nics.add_new() == ["eth0"]
    assert ("device_add", {"driver": "virtio-net-pci", "id": "nic0", "bus": "hp2", "netdev": "nic0-net",
                           "mac": "02:00:00:00:00:01"}) in vm.calls
    assert nics.interfaces() == [{"name": "eth0", "mac": "02:00:00:00:00:01", "tap": "tap0_vmrun",
                                  "addresses": ["198.18.0.2/24"]}]
    nics.remove("eth0")
    assert agent.removed == ["02:00:00:00:00:01"] and ("netdev_del", {"id": "nic0-net"}) in vm.calls
    assert nics.interfaces() == [] and nics._free_ports == ["hp3", "hp2"]
    with pytest.raises(NetworkError, match="no pod interface 'eth0'"):
        nics.remove("eth0")


def test_a_nic_the_agent_cannot_configure_is_unplugged_again():
    vm = FakeVM()
    nics = attachment.NetworkAttachment(vm, FakeAgent(fail=True), "/run/netns/pod", "tcfilter", ["hp2"])
    with pytest.raises(AgentError, match="no network device"):
        nics.add_new()
    assert not vm.plugged and nics.interfaces() == [] and nics._free_ports == ["hp2"]
    assert nics._network.removed  # its tap and mirrors are undone too


def test_no_free_port_is_a_clear_error():
    nics = attachment.NetworkAttachment(FakeVM(), FakeAgent(), "/run/netns/pod", "tcfilter", [])
    with pytest.raises(NetworkError, match="no free PCIe port in the guest for eth0"):
        nics.add_new()


def test_sync_follows_veths_that_come_and_go():
    """What the namespace watcher calls when dockerd connects or disconnects a network."""
    vm, agent = FakeVM(), FakeAgent()
    nics = attachment.NetworkAttachment(vm, agent, "/run/netns/pod", "tcfilter", ["hp2", "hp3"])
    assert nics.sync() == ["eth0"]
    nics._network.pending = [TapEndpoint(PodInterface("eth1", 9, "02:00:00:00:00:02", 1500), "tap1_vmrun", 10, -1)]
    nics._network.present = {7, 9}
    assert nics.sync() == ["eth1"]
    nics._network.present = {9}  # eth0's veth went
    assert nics.sync() == []
    assert agent.removed == ["02:00:00:00:00:01"]
    assert [nic["name"] for nic in nics.interfaces()] == ["eth1"]
