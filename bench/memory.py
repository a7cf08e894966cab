#!/usr/bin/env python3
"""Host memory of one idle pod, cold-booted and cloned from a template, from one run.

For each: `vmrun create` + `start` of a container running `sleep`, a short settle, then
the proportional set size (PSS, from /proc/PID/smaps_rollup) of every host process the
pod has: QEMU, virtiofsd, the vsock backend, the sandbox daemon and the shim. PSS counts
a page shared by N processes as 1/N to each, so the sum is the pod's real cost; a
clone's RAM (a memfd) is counted through QEMU's mapping of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun.busybox import make_busybox_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from leftovers import scan_processes  # noqa: E402

VMRUN = [sys.executable, "-m", "vmrun.cli"]


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def pod_processes(marker: str) -> dict[str, int]:
    """pid -> role for every process whose command line mentions `marker`."""
    roles = {"qemu-system": "QEMU", "virtiofsd": "virtiofsd", "vsock.vhost_user": "vsock backend",
             "sandbox_daemon": "sandbox daemon", "vmrun.shim": "shim"}
    found = {}
    for pid, cmdline in scan_processes(marker):
        # The program: argv[0], or the module of `python -m MODULE`.
        argv = cmdline.split()
        program = argv[argv.index("-m") + 1] if "-m" in argv[:3] else argv[0]
        for key, role in roles.items():
            if key in program:
                found[pid] = role
    return found


def measure(env: dict, root: Path, bundle: Path, name: str, marker: str) -> dict[str, int]:
    cli = [*VMRUN, "--root", str(root)]
    subprocess.run([*cli, "create", "--bundle", str(bundle), name], env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([*cli, "start", name], env=env, check=True)
        time.sleep(3)  # idle: let the guest settle
        totals: dict[str, int] = {}
        for pid, role in pod_processes(marker).items():
            totals[role] = totals.get(role, 0) + pss_kib(pid)
        return totals
    finally:
        subprocess.run([*cli, "delete", "--force", name], env=env, check=False)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-mem", dir="/tmp"))
    try:
        bundle = make_busybox_bundle(work / "bundle", ["sleep", "600"])
        config = work / "vmrun.toml"
        config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\ntemplate = ""\n')
        env = {**os.environ, "VMRUN_CONFIG": str(config)}
        results = {"booted": measure(env, work / "state", bundle, "booted", str(work))}
        subprocess.run([*VMRUN, "template", "create"], env=env, check=True, capture_output=True)
        config.write_text(config.read_text().replace('template = ""', 'template = "default"'))
        results["cloned"] = measure(env, work / "state", bundle, "cloned", str(work))
        roles = sorted({role for totals in results.values() for role in totals})
        print(f"{'PSS (MiB) of an idle pod':<26}" + "".join(f"{kind:>10}" for kind in results))
        for role in roles:
            print(f"{role:<26}" + "".join(f"{results[k].get(role, 0) / 1024:>10.1f}" for k in results))
        print(f"{'total':<26}" + "".join(f"{sum(results[k].values()) / 1024:>10.1f}" for k in results))
        ksm = Path("/sys/kernel/mm/ksm/run")
        print("\nKSM:", "available, run=" + ksm.read_text().strip() if ksm.exists() else "not available",
              "(it merges only private anonymous pages; a guest RAM file mapped share=on, as vhost-user needs, is not)")
        print(json.dumps(results))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
