"""Pod networking: a netns with a veth (as CNI leaves it) carried into the guest.

Every address is in the benchmarking range 198.18.0.0/15 and lives in namespaces this
test makes: the pod's, and a peer's at the veth's other end.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

POD_IP, PEER_IP = "198.18.0.2", "198.18.0.1"


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture
def pod_netns():
    """A pod netns with eth0 198.18.0.2/24 (default route via the peer), the peer netns at
    the veth's other end with 198.18.0.1/24."""
    pod, peer = f"vmrun-pod-{secrets.token_hex(3)}", f"vmrun-peer-{secrets.token_hex(3)}"
    ip("netns", "add", pod)
    ip("netns", "add", peer)
    try:
        ip("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", peer)
        ip("-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        ip("-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
        for ns, dev in ((pod, "eth0"), (peer, "peer0")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", pod, "route", "add", "default", "via", PEER_IP)
        yield pod, peer
    finally:
        ip("netns", "del", pod, check=False)
        ip("netns", "del", peer, check=False)


def in_netns(ns: str, *argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


def fetch(ns: str, url: str, timeout: float = 60) -> str:
    """GET `url` from inside `ns`, retrying while the server comes up."""
    code = ("import sys, time, urllib.request\n"
            f"deadline = time.time() + {timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        print(urllib.request.urlopen({url!r}, timeout=5).read().decode(), end='')\n"
            "        break\n"
            "    except OSError as exc:\n"
            "        if time.time() > deadline: sys.exit(f'fetch failed: {exc}')\n"
            "        time.sleep(0.2)\n")
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=timeout + 10)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_container_serves_and_fetches_over_the_pod_network(vm_env, pod_netns, tmp_path):
    pod, peer = pod_netns
    served = tmp_path / "served"
    served.mkdir()
    (served / "hello.txt").write_text("from the peer\n")
    server = in_netns(peer, sys.executable, "-m", "http.server", "--bind", PEER_IP, "8000",
                      "--directory", str(served), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bundle = vm_env.bundle("web", ["sh", "-c",
                                   f"wget -q -O - http://{PEER_IP}:8000/hello.txt; ip -o -4 addr show eth0; "
                                   "echo serving; exec httpd -f -p 8080 -h /www"])
    (bundle / "rootfs" / "www").mkdir()
    (bundle / "rootfs" / "www" / "index.html").write_text("from the guest\n")
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{pod}"})
    (bundle / "config.json").write_text(json.dumps(spec))
    run = vm_env.popen("run", "--bundle", str(bundle), "web", stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not lines or lines[-1] != "serving":
            line = run.stdout.readline().decode()
            assert line and time.monotonic() < deadline, f"no 'serving' from the guest: {lines} {run.stderr.read()}"
            lines.append(line.strip())
        # The guest fetched from the peer, and its eth0 carries the pod's address.
        assert "from the peer" in lines
        assert any(f"inet {POD_IP}/24" in line and "eth0" in line for line in lines), lines
        # The peer reaches the guest at the pod's address.
        assert fetch(peer, f"http://{POD_IP}:8080/index.html") == "from the guest\n"
        # While it runs: a tap beside eth0, mirrored both ways.
        assert "tap0_vmrun" in ip("-n", pod, "-o", "link", "show")
        assert "ingress" in subprocess.run(["tc", "-n", pod, "qdisc", "show", "dev", "eth0"],
                                           capture_output=True, text=True).stdout
    finally:
        vm_env.vmrun("kill", "web", "KILL")
        run.wait(60)
        server.kill()
        server.wait()
    # Nothing of ours is left in the pod's namespace; CNI's veth is as it was.
    assert "tap0_vmrun" not in ip("-n", pod, "-o", "link", "show")
    assert "ingress" not in subprocess.run(["tc", "-n", pod, "qdisc", "show", "dev", "eth0"],
                                           capture_output=True, text=True).stdout
    assert f"{POD_IP}/24" in ip("-n", pod, "-o", "addr", "show", "dev", "eth0")
