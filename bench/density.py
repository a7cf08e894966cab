#!/usr/bin/env python3
"""Host memory per idle pod: N templated pods (`vmrun create` + `start` of `sleep`), held,
measured, removed. Prints what the host loses per pod (MemAvailable before minus after,
divided by N, after the pods settle) and the PSS of each kind of host process per pod.

    python3 bench/density.py [N ...]        (default: 1 10)

The template is made first in a private directory and is not counted (its RAM file is in
the page cache once for all pods). Pods are made one after the other; each is one guest.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from kept_failures import keep_failed_logs
from vmrun.busybox import make_busybox_bundle

VMRUN = [sys.executable, "-m", "vmrun.cli"]
SETTLE_SECONDS = 10.0  # idle guests hand back freed pages (free page reporting) meanwhile
# How each host process of a pod shows in its command line.
KINDS = (("qemu", "qemu-system"), ("virtiofsd", "virtiofsd"), ("vsock backend", "vsock.vhost_user"),
         ("sandbox daemon", "vmrun.sandbox_daemon"), ("shim", "vmrun.shim"))


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise SystemExit("no MemAvailable in /proc/meminfo")


def pss_by_kind(marker: str, config: Path) -> dict[str, list[int]]:
    """PSS (KiB) of each process naming `marker` or running with this VMRUN_CONFIG (the
    sandbox daemon names neither path), by kind."""
    found: dict[str, list[int]] = defaultdict(list)
    env_marker = f"VMRUN_CONFIG={config}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmdline and env_marker not in (entry / "environ").read_bytes():
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue
        kind = next((name for name, needle in KINDS if needle in cmdline), None)
        if kind is None:
            continue
        pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        found[kind].append(pss)
    return found


def measure(n: int, base: Path, env: dict[str, str]) -> None:
    cli = [*VMRUN, "--root", str(base / f"state-{n}")]
    bundle = make_busybox_bundle(base / "bundle", ["sleep", "36000"])
    ids = [f"d{n}-{i}" for i in range(n)]
    subprocess.run(["sync"], check=False)
    time.sleep(2)
    before = mem_available_kib()
    started = time.monotonic()
    made = []
    try:
        for container_id in ids:
            for step in (["create", "--bundle", str(bundle), container_id], ["start", container_id]):
                # Into a file, not a pipe: the container's shim keeps create's stdio open.
                with tempfile.TemporaryFile() as errors:
                    result = subprocess.run([*cli, *step], env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=errors)
                    if result.returncode != 0:
                        errors.seek(0)
                        kept = keep_failed_logs(base / "run", "vdensity-failed-")
                        raise SystemExit(f"vmrun {step[0]} {container_id}: {errors.read().decode().strip()} "
                                         f"(logs kept in {kept})")
            made.append(container_id)
        startup = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)
        after = mem_available_kib()
        kinds = pss_by_kind(str(base / "run"), base / "vmrun.toml")
    finally:
        for container_id in made:
            subprocess.run([*cli, "delete", "--force", container_id], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    per_pod_mib = (before - after) / n / 1024
    print(f"\nN = {n}: {n} idle pods made in {startup:.1f} s ({startup / n:.2f} s each)")
    print(f"  host MemAvailable drop per pod: {per_pod_mib:.1f} MiB")
    print("  PSS per pod by process kind (MiB; and the median process):")
    total = 0.0
    for name, _ in KINDS:
        values = kinds.get(name, [])
        if not values:
            continue
        per_pod = sum(values) / n / 1024
        total += per_pod
        print(f"    {name:<16}{per_pod:7.1f}   ({len(values)} processes, median {statistics.median(values) / 1024:.1f})")
    print(f"    {'all':<16}{total:7.1f}")


def main() -> int:
    counts = [int(a) for a in sys.argv[1:]] or [1, 10]
    base = Path(tempfile.mkdtemp(prefix="vdens", dir="/tmp"))
    try:
        config = base / "vmrun.toml"
        config.write_text(f'run_dir = "{base}/run"\ntemplates_dir = "{base}/templates"\nboot_timeout = 120\n')
        env = {**os.environ, "VMRUN_CONFIG": str(config)}
        made = subprocess.run([*VMRUN, "template", "create"], env=env, capture_output=True)
        if made.returncode != 0:
            raise SystemExit(f"vmrun template create: {made.stderr.decode().strip()}")
        for n in counts:
            measure(n, base, env)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
