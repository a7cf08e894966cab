#!/usr/bin/env python3
"""A container's start through vmrun's shim v2 (`--runtime io.containerd.vmrun.v2`) beside
containerd's runc v2 shim running vmrun (`--runc-binary vmrun`), both cloning from the same
template: `ctr run -d` (until the task has started) and `ctr run --rm /bin/true` (start to
removal), alternating, several runs each; medians and extremes.

A private containerd (its own root, state and sockets under a temporary directory)
serves a busybox image built offline (tests/clients/images.py).

    python3 bench/ctr_shimv2_vs_runc_v2.py [RUNS]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from private_containerd import IMAGE, private_containerd  # beside this file

BIN = Path(sys.executable).parent  # vmrun and containerd-shim-vmrun-v2, as pip installed them


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="vbench", dir="/tmp"))
    vmrun_config = work / "vmrun.toml"
    vmrun_config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\n')
    env = {**os.environ, "VMRUN_CONFIG": str(vmrun_config), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    try:
        with private_containerd(work, env) as ctr:
            return _bench(work, env, ctr, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(work: Path, env: dict[str, str], ctr: list[str], runs: int) -> int:
    subprocess.run([str(BIN / "vmrun"), "template", "create"], check=True, capture_output=True, env=env)

    paths = {
        "runc v2 shim + BinaryName=vmrun": ["--runc-binary", str(BIN / "vmrun"), "--runc-root",
                                            str(work / "runtime-root")],
        "vmrun shim v2": ["--runtime", "io.containerd.vmrun.v2"],
    }

    def timed(args: list[str]) -> float:
        start = time.monotonic()
        result = subprocess.run([*ctr, *args], capture_output=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"ctr {' '.join(args)}: {result.stderr.decode()}")
        return time.monotonic() - start

    def remove(name: str) -> None:
        subprocess.run([*ctr, "task", "kill", "-s", "SIGKILL", name], capture_output=True)
        for _ in range(100):
            if subprocess.run([*ctr, "task", "delete", name], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run([*ctr, "container", "delete", name], capture_output=True)

    started: dict[str, list[float]] = {name: [] for name in paths}
    whole: dict[str, list[float]] = {name: [] for name in paths}
    for run in range(runs + 1):  # the first round warms both paths up, and is not counted
        for index, (name, flags) in enumerate(paths.items()):
            detached = f"d{run}x{index}"
            seconds = timed(["run", "-d", *flags, IMAGE, detached, "sleep", "60"])
            remove(detached)
            rm_seconds = timed(["run", "--rm", *flags, IMAGE, f"r{run}x{index}", "/bin/true"])
            if run:
                started[name].append(seconds)
                whole[name].append(rm_seconds)
    print(f"{runs} runs each, alternating; seconds: median (min-max)")
    print(f"{'path':<34}{'ctr run -d':>24}{'ctr run --rm true':>24}")
    for name in paths:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in (started[name], whole[name])]
        print(f"{name:<34}{cells[0]:>24}{cells[1]:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
