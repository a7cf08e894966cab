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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "clients"))
from images import write_archives  # noqa: E402

BIN = Path(sys.executable).parent  # vmrun and containerd-shim-vmrun-v2, as pip installed them
NS = "bench"
IMAGE = "docker.io/library/bbx:latest"


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="vbench", dir="/tmp"))
    containerd = None
    try:
        vmrun_config = work / "vmrun.toml"
        vmrun_config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\n')
        env = {**os.environ, "VMRUN_CONFIG": str(vmrun_config), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        (work / "config.toml").write_text(f"""version = 2
root = "{work}/root"
state = "{work}/state"
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
""")
        with open(work / "containerd.log", "wb") as log:
            containerd = subprocess.Popen(["containerd", "--config", str(work / "config.toml")], stdout=log,
                                          stderr=log, env=env, start_new_session=True)
        ctr = ["ctr", "--address", str(work / "containerd.sock"), "-n", NS]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("containerd did not start")
            time.sleep(0.1)
        write_archives(IMAGE, work / "bbx-oci.tar")
        subprocess.run([*ctr, "image", "import", str(work / "bbx-oci.tar")], check=True, capture_output=True)
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
    finally:
        if containerd is not None:
            os.killpg(containerd.pid, signal.SIGTERM)
            containerd.wait(30)
        for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            point = mount.split()[1]
            if point.startswith(str(work)):
                subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
