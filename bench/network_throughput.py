#!/usr/bin/env python3
"""TCP throughput between the host side of a pod's veth and the container, vmrun beside
runc, from one run.

A pod netns (eth0 198.18.0.2/24, as CNI would leave it) and a peer netns at the veth's
other end (198.18.0.1) are made here and removed after. A server in the peer receives
64 MiB from the container (upload) and sends it 64 MiB (download); busybox's dd and nc
run in the container. vmrun carries eth0 into the guest with its tcfilter model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmrun.busybox import make_busybox_bundle

VMRUN = [sys.executable, "-m", "vmrun.cli"]
MIB = 64
POD_IP, PEER_IP = "198.18.0.2", "198.18.0.1"

# The peer's side: one upload, then one download; seconds of each, as JSON.
PEER_SERVER = f"""
import json, socket, time
size = {MIB} << 20
up, down = socket.create_server(("{PEER_IP}", 5001)), socket.create_server(("{PEER_IP}", 5002))
print("listening", flush=True)
conn, _ = up.accept()
got, started = 0, None
while chunk := conn.recv(1 << 20):
    started = started or time.monotonic()
    got += len(chunk)
upload = time.monotonic() - started
conn.close()
conn, _ = down.accept()
started = time.monotonic()
block = bytes(1 << 20)
for _ in range(size >> 20):
    conn.sendall(block)
conn.shutdown(socket.SHUT_WR)
while conn.recv(1 << 16):
    pass  # the container read it all when its nc closes
download = time.monotonic() - started
print(json.dumps({{"upload_bytes": got, "upload_s": upload, "download_s": download}}), flush=True)
"""

CONTAINER = (f"dd if=/dev/zero bs=1048576 count={MIB} 2>/dev/null | nc {PEER_IP} 5001; "
             f"nc {PEER_IP} 5002 > /dev/null")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_netns() -> tuple[str, str]:
    pod, peer = f"bench-pod-{secrets.token_hex(3)}", f"bench-peer-{secrets.token_hex(3)}"
    ip("netns", "add", pod)
    ip("netns", "add", peer)
    ip("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", peer)
    ip("-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
    ip("-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
    for ns, dev in ((pod, "eth0"), (peer, "peer0"), (pod, "lo"), (peer, "lo")):
        ip("-n", ns, "link", "set", dev, "up")
    return pod, peer


def measure(peer: str, runtime_argv: list[str], env: dict | None = None) -> dict:
    server = subprocess.Popen(["ip", "netns", "exec", peer, sys.executable, "-c", PEER_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        container = subprocess.run(runtime_argv, capture_output=True, env=env, timeout=600)
        if container.returncode != 0:
            raise RuntimeError(f"{runtime_argv[0]}: {container.stderr.decode().strip()}")
        result = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    if result["upload_bytes"] != MIB << 20:
        raise RuntimeError(f"upload carried {result['upload_bytes']} bytes, not {MIB << 20}")
    return result


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-net", dir="/tmp"))
    pod, peer = make_netns()
    try:
        bundle = make_busybox_bundle(work / "bundle", ["sh", "-c", CONTAINER])
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
        spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{pod}"})
        (bundle / "config.json").write_text(json.dumps(spec))
        config = work / "vmrun.toml"
        config.write_text(f'run_dir = "{work}/run"\ntemplate = ""\n')
        rows = []
        runc = shutil.which("runc")
        if runc:
            rows.append(("runc", measure(peer, [runc, "--root", str(work / "runc"), "run", "--bundle",
                                                str(bundle), "net-runc"])))
        rows.append(("vmrun (tcfilter, TCG)", measure(
            peer, [*VMRUN, "--root", str(work / "state"), "run", "--bundle", str(bundle), "net-vmrun"],
            {**os.environ, "VMRUN_CONFIG": str(config)})))
        print(f"{'runtime':<24}{'container -> peer MB/s':>24}{'peer -> container MB/s':>24}")
        for name, result in rows:
            print(f"{name:<24}{MIB * 1.048576 / result['upload_s']:>24.1f}"
                  f"{MIB * 1.048576 / result['download_s']:>24.1f}")
        return 0
    finally:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True)
        subprocess.run(["ip", "netns", "del", peer], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
