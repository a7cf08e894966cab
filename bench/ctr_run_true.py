#!/usr/bin/env python3
"""`ctr run --rm` of /bin/true through containerd's runc v2 shim: runc beside vmrun
(cold boot, cloned from a template, and taken from a pool of ready guests), from one run
each after a runc warm-up.

A private containerd (its own root, state and sockets under a temporary directory)
serves a busybox image built offline (tests/clients/images.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from private_containerd import IMAGE, private_containerd  # beside this file

VMRUN = str(Path(sys.executable).parent / "vmrun")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vbench", dir="/tmp"))
    vmrun_config = work / "vmrun.toml"
    vmrun_config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\ntemplate = ""\n')
    env = {**os.environ, "VMRUN_CONFIG": str(vmrun_config)}
    try:
        with private_containerd(work, env) as ctr:
            return _bench(work, vmrun_config, env, ctr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(work: Path, vmrun_config: Path, env: dict[str, str], ctr: list[str]) -> int:
    def ctr_run(runtime: str, name: str) -> tuple[float, int]:
        start = time.monotonic()
        result = subprocess.run([*ctr, "run", "--rm", "--runc-binary", runtime, "--runc-root",
                                 str(work / "runtime-root"), IMAGE, name, "/bin/true"],
                                capture_output=True, env=env)
        seconds = time.monotonic() - start
        if result.returncode != 0:
            print(result.stderr.decode(), file=sys.stderr)
        return seconds, result.returncode

    ctr_run(shutil.which("runc") or "runc", "warmup")
    rows = [("ctr run --rm, runc", *ctr_run(shutil.which("runc") or "runc", "r1")),
            ("ctr run --rm, vmrun (cold boot)", *ctr_run(VMRUN, "v1"))]
    made = subprocess.run([VMRUN, "template", "create"], capture_output=True, env=env)
    if made.returncode == 0:
        vmrun_config.write_text(vmrun_config.read_text().replace('template = ""', 'template = "default"'))
        rows.append(("ctr run --rm, vmrun (template)", *ctr_run(VMRUN, "v2")))
    vmrun_config.write_text(vmrun_config.read_text() + f'pool_socket = "{work}/pool.sock"\npool_size = 1\n')
    pool = subprocess.Popen([VMRUN, "pool", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while b'"idle": 1' not in subprocess.run([VMRUN, "pool", "status"], capture_output=True,
                                                  env=env).stdout:
            if time.monotonic() > deadline:
                raise SystemExit("the pool did not fill")
            time.sleep(0.2)
        rows.append(("ctr run --rm, vmrun (pool)", *ctr_run(VMRUN, "v3")))
    finally:
        pool.terminate()
        pool.wait(60)
    print(f"{'command':<34}{'wall s':>8}{'rc':>5}")
    for name, seconds, rc in rows:
        print(f"{name:<34}{seconds:>8.3f}{rc:>5}")
    return max(rc for _, _, rc in rows)


if __name__ == "__main__":
    sys.exit(main())
