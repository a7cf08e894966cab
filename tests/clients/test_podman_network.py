"""podman's default network drives vmrun containers (no --network flag).

podman 4.3 from Debian uses CNI (containernetworking-plugins in /usr/lib/cni): for a
container it makes a network namespace (/run/netns/netns-<uuid>), the CNI bridge plugin
puts a veth there with an address from 10.88.0.0/16 (bridge cni-podman0, firewall and
tuning plugins: iptables rules), and the spec joins that namespace by path. vmrun carries
the veth into the guest (tap + tc mirroring, a NIC hot-plugged) and crun in the guest joins
the namespace by path, so the net.* sysctl podman adds (containers.conf's default_sysctls:
`net.ipv4.ping_group_range=0 0`, as Debian's own containers.conf says) is applied there.

podman runs in a network namespace the test makes (tests/clients/podman_env.py,
`make_netns`): the bridge, the veths' host ends and the iptables rules stay in it. After
every test nothing may be left: no container, process, mount, vmrun state, sandbox dir,
vmrun container netns, nor podman's /run/netns/netns-*.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from engine_cases import ping_from
from podman_env import IMAGE

pytestmark = [pytest.mark.integration, pytest.mark.clients]

# RUN_FLAGS without "--network none": the default network.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
# podman, its bridge and its rules in a network namespace of the test's (conftest.py).
PODMAN_OWN_NETNS = True




def _network_settings(podman, name: str) -> dict:
    result = podman("inspect", "--format", "{{json .NetworkSettings}}", name, timeout=60)
    assert result.returncode == 0, podman.explain(result)
    return json.loads(result.stdout)


def test_default_network_eth0_and_sysctl(podman):
    name = f"vmrun-net-{uuid.uuid4().hex[:8]}"
    result = podman("run", "-d", "--name", name, *ULIMITS, IMAGE, "sleep", "600")
    assert result.returncode == 0, podman.explain(result)
    try:
        settings = _network_settings(podman, name)
        assert settings["SandboxKey"], f"podman made no network namespace: {settings}"
        assert list(settings["Networks"]) == ["podman"], settings
        address, prefix = settings["IPAddress"], settings["IPPrefixLen"]
        assert address and prefix, settings

        result = podman("exec", name, "ip", "-o", "addr", "show", "dev", "eth0", timeout=120)
        assert result.returncode == 0, podman.explain(result)
        assert re.findall(r"inet (\S+)", result.stdout) == [f"{address}/{prefix}"], podman.explain(result)
        result = podman("exec", name, "cat", "/sys/class/net/eth0/address", timeout=60)
        assert result.stdout.strip().lower() == settings["MacAddress"].lower(), podman.explain(result)
        result = podman("exec", name, "ip", "route", timeout=60)
        assert f"default via {settings['Gateway']} dev eth0" in result.stdout, podman.explain(result)

        # The sysctl podman put in the spec, applied in the container's network namespace.
        result = podman("exec", name, "cat", PING_GROUP_RANGE, timeout=60)
        assert result.returncode == 0 and result.stdout.split() == ["0", "0"], podman.explain(result)

        # Traffic flows: the bridge (cni-podman0, in the test's namespace) answers.
        deadline = time.monotonic() + 60
        while True:
            result = podman("exec", name, "ping", "-c", "1", "-W", "3", settings["Gateway"], timeout=60)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert result.returncode == 0 and "1 packets received" in result.stdout, podman.explain(result)
    finally:
        podman("rm", "--force", "--time", "0", name, timeout=120)


def test_default_network_run_rm(podman):
    """run --rm: the address, then conmon's cleanup process tears the network down."""
    script = f"ip -o -4 addr show dev eth0; cat {PING_GROUP_RANGE}"
    result = podman("run", "--rm", *ULIMITS, IMAGE, "sh", "-c", script)
    assert result.returncode == 0, podman.explain(result)
    assert re.search(r"inet 10\.88\.\d+\.\d+/16", result.stdout), podman.explain(result)
    assert result.stdout.split()[-2:] == ["0", "0"], podman.explain(result)


def test_network_none_sysctl(podman):
    """--network none: a new namespace without a path (vmrun makes it), the sysctl applies."""
    result = podman("run", "--rm", "--network", "none", *ULIMITS, IMAGE, "sh", "-c",
                    f"cat {PING_GROUP_RANGE}; ls /sys/class/net")
    assert result.returncode == 0, podman.explain(result)
    lines = result.stdout.split()
    assert lines[:2] == ["0", "0"] and lines[2:] == ["lo"], podman.explain(result)



def test_two_containers_ping_and_restart(podman):
    """Two guests on podman's bridge reach each other; after `podman restart` (kill, delete,
    create, start: the network set up again) too."""
    first, second = (f"vmrun-p{i}-{uuid.uuid4().hex[:8]}" for i in (1, 2))
    try:
        for name in (first, second):
            result = podman("run", "-d", "--name", name, *ULIMITS, IMAGE, "sleep", "600")
            assert result.returncode == 0, podman.explain(result)
        ping_from(podman, first, _network_settings(podman, second)["IPAddress"])
        ping_from(podman, second, _network_settings(podman, first)["IPAddress"])
        result = podman("restart", "--time", "0", second, timeout=240)
        assert result.returncode == 0, podman.explain(result)
        address = _network_settings(podman, second)["IPAddress"]
        result = podman("exec", second, "ip", "-o", "-4", "addr", "show", "dev", "eth0", timeout=60)
        assert f"inet {address}/" in result.stdout, podman.explain(result)
        ping_from(podman, first, address)
    finally:
        podman("rm", "--force", "--time", "0", first, second, timeout=120)
