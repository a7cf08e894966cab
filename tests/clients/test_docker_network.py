"""dockerd's own networking drives vmrun containers: a user-defined bridge network.

dockerd (tests/clients/docker_env.py, `--bridge none --iptables=false`: no docker0, but
user-defined bridge networks) runs in the network namespace the env creates (so the
bridge, the veths and any iptables rules stay in it).
`docker run --runtime vmrun --network <net>`: dockerd's `libnetwork-setkey` prestart hook
moves a veth into /proc/<pid>/ns/net of the pid vmrun reports (its shim, in a network
namespace vmrun made), names it eth0 and gives it docker's address; vmrun carries it into
the guest (tap + tc mirroring, a NIC hot-plugged). So the container's eth0 must show the
address `docker inspect` reports, and a second vmrun container on the same network must
answer ping.

By name: docker's embedded DNS server (127.0.0.11, the container's resolv.conf) listens
in the container's *host* network namespace (dockerd opens its socket on 127.0.0.11:<port>
there and adds iptables DNAT rules for port 53 there). In the guest, 127.0.0.11 is the
guest's own loopback: vmrun's DNS relay answers there (UDP), asking the host namespace.
Without it, busybox's nslookup says "write to '127.0.0.11': Connection refused".

A network connected to a running container (`docker network connect`) is not carried into
the guest: see test_network_connect_running.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest

from docker_env import IMAGE
from engine_cases import ping_from

pytestmark = [pytest.mark.integration, pytest.mark.clients]

# dockerd as docker_env starts it: `--bridge none` only drops the default bridge (docker0),
# user-defined bridge networks are still made; with --iptables=false the containers reach
# each other over the bridge all the same, and dockerd still puts its DNS DNAT rules in each
# container's namespace (it does that whatever --iptables says).
SUBNET = "172.29.77.0/24"


class InterfaceNotInGuest(AssertionError):
    """The one failure test_network_connect_running expects."""




@pytest.fixture
def network(docker):
    name = f"vmrun-net-{uuid.uuid4().hex[:8]}"
    result = docker("network", "create", "--driver", "bridge", "--subnet", SUBNET, name, timeout=60)
    assert result.returncode == 0, docker.explain(result)
    yield name
    result = docker("network", "rm", name, timeout=60)
    assert result.returncode == 0, docker.explain(result)


def _run_detached(docker, network: str, name: str) -> None:
    result = docker("run", "-d", "--runtime", "vmrun", "--network", network, "--name", name, IMAGE,
                    "sleep", "600")
    assert result.returncode == 0, docker.explain(result)


def _docker_address(docker, name: str, network: str) -> str:
    result = docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", name, timeout=60)
    assert result.returncode == 0, docker.explain(result)
    networks = json.loads(result.stdout)
    address = networks[network]["IPAddress"]
    assert address, f"docker gave {name} no address: {networks}"
    return address


def _eth0_addresses(docker, name: str) -> list[str]:
    result = docker("exec", name, "ip", "-o", "-4", "addr", "show", "dev", "eth0", timeout=120)
    assert result.returncode == 0, docker.explain(result)
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/\d+", result.stdout)


def _remove(docker, *names: str) -> None:
    docker("rm", "--force", *names, timeout=120)


def test_eth0_has_dockers_address(docker, network):
    name = f"vmrun-n1-{uuid.uuid4().hex[:8]}"
    _run_detached(docker, network, name)
    try:
        address = _docker_address(docker, name, network)
        assert _eth0_addresses(docker, name) == [address], docker.explain(
            docker("exec", name, "ip", "addr", timeout=60))
        mac = docker("inspect", "--format", f"{{{{(index .NetworkSettings.Networks \"{network}\").MacAddress}}}}",
                     name, timeout=60).stdout.strip()
        result = docker("exec", name, "cat", "/sys/class/net/eth0/address", timeout=60)
        assert mac and result.stdout.strip() == mac, docker.explain(result)
        result = docker("exec", name, "ip", "route", timeout=60)
        assert "default via 172.29.77.1 dev eth0" in result.stdout, docker.explain(result)
        # The guest's kernel, not the host's: the address is the guest's own.
        kernel = docker("exec", name, "uname", "-r", timeout=60).stdout.strip()
        assert kernel and kernel != os.uname().release, f"the container ran on the host's kernel {kernel}"
    finally:
        _remove(docker, name)


def test_restart_keeps_network(docker, network):
    """restart and stop/start: a new create, so a new host namespace for dockerd's hook, and
    the same address in the new guest."""
    name = f"vmrun-r-{uuid.uuid4().hex[:8]}"
    _run_detached(docker, network, name)
    try:
        address = _docker_address(docker, name, network)
        for step in (("restart", "-t", "1", name), ("stop", "-t", "1", name), ("start", name)):
            result = docker(*step, timeout=240)
            assert result.returncode == 0, docker.explain(result)
        assert _docker_address(docker, name, network) == address
        assert _eth0_addresses(docker, name) == [address]
        ping_from(docker, name, "172.29.77.1")  # the bridge, in the env's namespace
    finally:
        _remove(docker, name)


def _wait_for_addresses(docker, name: str, present: str, absent: str = "") -> None:
    deadline = time.monotonic() + 60
    while True:
        result = docker("exec", name, "ip", "-o", "-4", "addr", timeout=60)
        if f"inet {present}/" in result.stdout and not (absent and f"inet {absent}/" in result.stdout):
            return
        if time.monotonic() > deadline:
            raise InterfaceNotInGuest(f"want {present}, not {absent or '-'}\n" + docker.explain(result))
        time.sleep(1)


def test_network_connect_and_disconnect_while_running(docker, network):
    """dockerd moves a second veth into the container's namespace on the host while it runs:
    vmrun watches that namespace and plugs (or unplugs) the guest's NIC."""
    name = f"vmrun-c-{uuid.uuid4().hex[:8]}"
    second = f"vmrun-net2-{uuid.uuid4().hex[:8]}"
    result = docker("network", "create", "--driver", "bridge", "--subnet", "172.29.78.0/24", second, timeout=60)
    assert result.returncode == 0, docker.explain(result)
    try:
        _run_detached(docker, network, name)
        first_address = _docker_address(docker, name, network)
        result = docker("network", "connect", second, name, timeout=60)
        assert result.returncode == 0, docker.explain(result)
        address = _docker_address(docker, name, second)
        _wait_for_addresses(docker, name, address)
        ping_from(docker, name, "172.29.78.1")  # the second network's bridge
        result = docker("network", "disconnect", second, name, timeout=60)
        assert result.returncode == 0, docker.explain(result)
        _wait_for_addresses(docker, name, first_address, absent=address)
    finally:
        _remove(docker, name)
        docker("network", "rm", second, timeout=60)



def test_ping_by_address(docker, network):
    first, second = (f"vmrun-p{i}-{uuid.uuid4().hex[:8]}" for i in (1, 2))
    _run_detached(docker, network, first)
    try:
        _run_detached(docker, network, second)
        ping_from(docker, first, _docker_address(docker, second, network))
        ping_from(docker, second, _docker_address(docker, first, network))
    finally:
        _remove(docker, first, second)


def test_ping_by_name(docker, network):
    first, second = (f"vmrun-d{i}-{uuid.uuid4().hex[:8]}" for i in (1, 2))
    _run_detached(docker, network, first)
    try:
        _run_detached(docker, network, second)
        ping_from(docker, first, _docker_address(docker, second, network))  # the network itself works
        resolv = docker("exec", first, "cat", "/etc/resolv.conf", timeout=60)
        assert "nameserver 127.0.0.11" in resolv.stdout, docker.explain(resolv)
        for here, there in ((first, second), (second, first)):
            lookup = docker("exec", here, "nslookup", there, timeout=60)
            assert lookup.returncode == 0 and _docker_address(docker, there, network) in lookup.stdout, (
                "docker's embedded DNS did not answer in the guest (vmrun's DNS relay: "
                "vmrun/network/dns_relay.py, vmrun/agent/dns_relay.py)\n" + docker.explain(lookup))
            ping_from(docker, here, there)
    finally:
        _remove(docker, first, second)
