"""Pod networking: a netns with a veth (as CNI leaves it) carried into the guest.

Every address is in the benchmarking range 198.18.0.0/15 and lives in namespaces this
test makes: the pod's, and a peer's at the veth's other end.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time

import pytest
from netns_http import fetch_in_netns

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
        assert fetch_in_netns(peer, f"http://{POD_IP}:8080/index.html") == "from the guest\n"
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


def test_scan_sees_what_cni_left(pod_netns):
    from pyroute2 import IPRoute

    from vmrun.network.netns import run_in_netns
    from vmrun.network.scan import scan_interfaces

    pod, _ = pod_netns
    ip("-n", pod, "route", "add", "198.19.0.0/16", "via", PEER_IP)
    ip("-n", pod, "neigh", "add", "198.18.0.9", "lladdr", "02:00:00:00:00:09", "dev", "eth0", "nud", "permanent")
    ip("-n", pod, "link", "set", "eth0", "mtu", "1400")

    def scan():
        with IPRoute() as ipr:
            return scan_interfaces(ipr)

    (eth0,) = run_in_netns(f"/run/netns/{pod}", scan)
    assert (eth0.name, eth0.mtu) == ("eth0", 1400)
    assert eth0.mac == ip("-n", pod, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
    assert [(a.address, a.prefix_len) for a in eth0.addresses] == [(POD_IP, 24)]
    routes = {(r.destination, r.prefix_len, r.gateway) for r in eth0.routes}
    # The kernel's own route for 198.18.0.0/24 is not carried: the guest's kernel makes it.
    assert routes == {("", 0, PEER_IP), ("198.19.0.0", 16, PEER_IP)}
    assert [(n.address, n.mac) for n in eth0.neighbors] == [("198.18.0.9", "02:00:00:00:00:09")]


def test_pod_network_teardown_leaves_only_what_cni_made(pod_netns):
    from vmrun.network.tcfilter import PodNetwork

    pod, _ = pod_netns
    before = ip("-n", pod, "-o", "link", "show")
    network = PodNetwork(f"/run/netns/{pod}", "tcfilter")
    (endpoint,) = network.add_new()
    assert endpoint.interface.name == "eth0" and endpoint.tap_name in ip("-n", pod, "-o", "link", "show")
    filters = subprocess.run(["tc", "-n", pod, "filter", "show", "dev", "eth0", "ingress"],
                             capture_output=True, text=True).stdout
    assert f"Egress Redirect to device {endpoint.tap_name}" in filters
    network.close()
    # The tap went with its last fd, the qdisc and filters with close().
    assert ip("-n", pod, "-o", "link", "show") == before
    assert "ingress" not in subprocess.run(["tc", "-n", pod, "qdisc", "show", "dev", "eth0"],
                                           capture_output=True, text=True).stdout


def test_a_missing_netns_is_a_one_line_error_and_leaves_nothing(vm_env):
    bundle = vm_env.bundle("nonet", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": "/run/netns/vmrun-no-such-ns"})
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "nonet")
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        "vmrun: network namespace /run/netns/vmrun-no-such-ns: No such file or directory"]
    assert vm_env.vmrun("list", "-q").stdout == b""


def pod_bundle(vm_env, name: str, pod: str, args: list[str]):
    bundle = vm_env.bundle(name, args)
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{pod}"})
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, spec


def test_hosts_hostname_and_resolv_conf_reach_the_container(vm_env, pod_netns, tmp_path):
    pod, _ = pod_netns
    files = {"hosts": "198.18.0.2 web.pod.test web\n", "hostname": "web\n",
             "resolv.conf": "nameserver 198.18.0.53\nsearch pod.test\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    bundle, spec = pod_bundle(vm_env, "etc", pod, ["sh", "-c",
                              "cat /etc/hosts /etc/hostname /etc/resolv.conf; hostname"])
    spec["hostname"] = "web"
    spec["mounts"] += [{"destination": f"/etc/{name}", "type": "bind", "source": str(tmp_path / name),
                        "options": ["rbind", "ro"]} for name in files]
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "etc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "".join(files.values()) + "web\n"


def test_a_netns_that_vanished_mid_run_does_not_break_the_teardown(vm_env, pod_netns):
    pod, _ = pod_netns
    bundle, _ = pod_bundle(vm_env, "gone", pod, ["sh", "-c", "echo up; read x"])
    run = vm_env.popen("run", "--bundle", str(bundle), "gone", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout.readline() == b"up\n", run.stderr.read()
        ip("netns", "del", pod)  # CNI's DEL came first: the namespace (and its veth) are gone
        run.stdin.write(b"bye\n")
        run.stdin.close()
        assert run.wait(60) == 0, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_interfaces_are_hot_added_and_removed(vm_env, pod_netns):
    pod, peer = pod_netns
    bundle, _ = pod_bundle(vm_env, "hot", pod, ["sh", "-c", "echo serving; exec httpd -f -p 8080 -h /www"])
    (bundle / "rootfs" / "www").mkdir()
    (bundle / "rootfs" / "www" / "index.html").write_text("hot\n")
    run = vm_env.popen("run", "--bundle", str(bundle), "hot", stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout.readline() == b"serving\n", run.stderr.read()
        # A second CNI ADD: net1 with 198.18.1.2/24, its peer 198.18.1.1/24.
        ip("-n", pod, "link", "add", "net1", "type", "veth", "peer", "name", "peer1", "netns", peer)
        ip("-n", pod, "addr", "add", "198.18.1.2/24", "dev", "net1")
        ip("-n", peer, "addr", "add", "198.18.1.1/24", "dev", "peer1")
        ip("-n", pod, "link", "set", "net1", "up")
        ip("-n", peer, "link", "set", "peer1", "up")

        added = vm_env.vmrun("network", "add", "hot")
        assert added.returncode == 0 and added.stdout == b"net1\n", added.stderr
        assert fetch_in_netns(peer, "http://198.18.1.2:8080/index.html") == "hot\n"
        listing = json.loads(vm_env.vmrun("network", "ls", "-f", "json", "hot").stdout)
        assert sorted((e["name"], e["addresses"][0]) for e in listing) == [
            ("eth0", f"{POD_IP}/24"), ("net1", "198.18.1.2/24")]
        again = vm_env.vmrun("network", "add", "hot")
        assert again.returncode == 0 and again.stdout == b""  # nothing new to plug

        removed = vm_env.vmrun("network", "rm", "hot", "net1")
        assert removed.returncode == 0, removed.stderr
        assert [e["name"] for e in json.loads(vm_env.vmrun("network", "ls", "-f", "json", "hot").stdout)] == ["eth0"]
        assert "tap1_vmrun" not in ip("-n", pod, "-o", "link", "show")
        assert "ingress" not in subprocess.run(["tc", "-n", pod, "qdisc", "show", "dev", "net1"],
                                               capture_output=True, text=True).stdout
        # eth0 still carries the pod.
        assert fetch_in_netns(peer, f"http://{POD_IP}:8080/index.html") == "hot\n"
        unknown = vm_env.vmrun("network", "rm", "hot", "net7")
        assert unknown.returncode == 1 and b"no pod interface 'net7'" in unknown.stderr
    finally:
        vm_env.vmrun("kill", "hot", "KILL")
        run.wait(60)


def test_a_pooled_guest_takes_the_pod_network(vm_env, pod_netns):
    from test_pool import wait_for_pool

    pod, peer = pod_netns
    vm_env.config_path.write_text(vm_env.config_path.read_text()
                                  + f'pool_socket = "{vm_env.base}/pool.sock"\npool_size = 1\n')
    bundle, _ = pod_bundle(vm_env, "pooledweb", pod, ["httpd", "-f", "-p", "8080", "-h", "/www"])
    (bundle / "rootfs" / "www").mkdir()
    (bundle / "rootfs" / "www" / "index.html").write_text("pooled\n")
    pool = vm_env.popen("pool", "serve", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    try:
        wait_for_pool(vm_env, 1)
        assert vm_env.vmrun("create", "--bundle", str(bundle), "pw", detached=True).returncode == 0
        assert vm_env.vmrun("start", "pw").returncode == 0
        # Handed out by the pool, then given the pod's eth0 through the daemon's control socket.
        addresses = vm_env.vmrun("exec", "pw", "ip", "-o", "-4", "addr", "show", "eth0")
        assert f"inet {POD_IP}/24" in addresses.stdout.decode(), addresses
        assert fetch_in_netns(peer, f"http://{POD_IP}:8080/index.html") == "pooled\n"
    finally:
        vm_env.vmrun("delete", "--force", "pw")
        pool.send_signal(signal.SIGTERM)
        pool.communicate(timeout=60)
    assert "tap0_vmrun" not in ip("-n", pod, "-o", "link", "show")


def test_the_none_model_makes_the_tap_only(pod_netns):
    from vmrun.network.tcfilter import PodNetwork

    pod, _ = pod_netns
    network = PodNetwork(f"/run/netns/{pod}", "none")
    try:
        (endpoint,) = network.add_new()
        flags = ip("-n", pod, "-o", "link", "show", endpoint.tap_name).split("<")[1].split(">")[0]
        assert "UP" in flags.split(",")
        assert "ingress" not in subprocess.run(["tc", "-n", pod, "qdisc", "show", "dev", "eth0"],
                                               capture_output=True, text=True).stdout
    finally:
        network.close()
    assert endpoint.tap_name not in ip("-n", pod, "-o", "link", "show")


def test_a_prestart_hook_networks_the_container_as_dockerd_does(vm_env):
    """dockerd's libnetwork-setkey hook moves a veth into the network namespace of the pid
    in the state it reads, and addresses it: vmrun carries that into the guest. The
    container's net.* sysctl applies in the guest, as podman's ping_group_range must."""
    peer = f"vmrun-peer-{secrets.token_hex(3)}"
    ip("netns", "add", peer)
    try:
        ip("-n", peer, "link", "set", "lo", "up")
        bundle = vm_env.bundle("hooknet", ["sh", "-c", "ip -o -4 addr show eth0; "
                                           "cat /proc/sys/net/ipv4/ping_group_range; ping -c 1 -W 10 198.18.1.1"])
        spec = json.loads((bundle / "config.json").read_text())
        assert {"type": "network"} in spec["linux"]["namespaces"]  # a new one: vmrun makes it
        spec["linux"]["sysctl"] = {"net.ipv4.ping_group_range": "0 2147483647"}
        for caps in spec["process"]["capabilities"].values():
            caps.append("CAP_NET_RAW")  # busybox ping opens a raw socket
        wire = (f'pid=$(sed -n \'s/.*"pid": *\\([0-9]*\\).*/\\1/p\'); '
                f"ip -n {peer} link add veth-h type veth peer name eth0 netns $pid && "
                f"ip -n {peer} addr add 198.18.1.1/24 dev veth-h && ip -n {peer} link set veth-h up && "
                f"nsenter --net=/proc/$pid/ns/net ip addr add 198.18.1.2/24 dev eth0 && "
                f"nsenter --net=/proc/$pid/ns/net ip link set eth0 up")
        spec["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", wire], "timeout": 30}]}
        (bundle / "config.json").write_text(json.dumps(spec))
        for command in ("run", "create"):
            name = f"hooknet-{command}"
            if command == "run":
                result = vm_env.vmrun("run", "--bundle", str(bundle), name)
                out = result.stdout.decode()
            else:
                out_file = vm_env.base / "out"
                with open(out_file, "wb") as stdout, open(vm_env.base / "err", "wb") as stderr:
                    result = subprocess.run([*vm_env.cli(), "create", "--bundle", str(bundle), name],
                                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                            env=vm_env.env, timeout=180)
                assert result.returncode == 0, (vm_env.base / "err").read_text()
                assert vm_env.vmrun("start", name).returncode == 0
                deadline = time.monotonic() + 60
                while json.loads(vm_env.vmrun("state", name).stdout)["status"] != "stopped":
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
                assert vm_env.vmrun("delete", name).returncode == 0
                out = out_file.read_text()
            assert "inet 198.18.1.2/24" in out, (command, out, result.stderr)
            assert "0\t2147483647" in out and "1 packets received" in out, (command, out)
            ip("-n", peer, "link", "del", "veth-h", check=False)  # gone with the namespace anyway
    finally:
        ip("netns", "del", peer, check=False)


def test_a_spec_without_a_mount_namespace_runs(vm_env):
    bundle = vm_env.bundle("nomnt", ["echo", "ran"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "mount"]
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "nomnt")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr


def test_a_name_server_on_the_containers_loopback_answers_in_the_guest(vm_env):
    """dockerd's embedded DNS listens at 127.0.0.11 in the container's own namespace on
    the host: the guest's queries to it are relayed there."""
    from dns_answerer import DnsAnswerer

    resolv = vm_env.base / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.11\noptions ndots:0\n")
    bundle = vm_env.bundle("dns", ["sh", "-c", "nslookup peer.test; nslookup other.test"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv),
                           "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    pid_file, out = vm_env.base / "pid", vm_env.base / "out"
    with open(out, "wb") as stdout, open(vm_env.base / "err", "wb") as stderr:
        created = subprocess.run([*vm_env.cli(), "create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                                  "dns"], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=vm_env.env,
                                 timeout=180)
    assert created.returncode == 0, (vm_env.base / "err").read_text()
    answerer = DnsAnswerer(f"/proc/{int(pid_file.read_text())}/ns/net", "127.0.0.11", "198.18.1.7")
    try:
        assert vm_env.vmrun("start", "dns").returncode == 0
        deadline = time.monotonic() + 60
        while json.loads(vm_env.vmrun("state", "dns").stdout)["status"] != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        answerer.close()
        vm_env.vmrun("delete", "--force", "dns")
    text = out.read_text()
    assert text.count("198.18.1.7") == 2 and "peer.test" in text and "other.test" in text, (text, answerer.queries)


def test_a_mistyped_namespace_does_not_become_the_pods_network(vm_env, pod_netns):
    pod, _ = pod_netns
    bundle = vm_env.bundle("typo", ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(spec))  # no network of its own: none attached
    assert vm_env.vmrun("create", "--bundle", str(bundle), "typo", detached=True).returncode == 0
    try:
        typo = vm_env.vmrun("network", "add", "--netns", "/run/netns/vmrun-no-such-pod", "typo")
        assert typo.returncode == 1 and b"/run/netns/vmrun-no-such-pod" in typo.stderr
        added = vm_env.vmrun("network", "add", "--netns", f"/run/netns/{pod}", "typo")
        assert added.returncode == 0 and added.stdout == b"eth0\n", added.stderr
    finally:
        vm_env.vmrun("delete", "--force", "typo")
