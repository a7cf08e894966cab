#!/usr/bin/env python3
"""20 sandboxes started in a row (`vmrun create` + `start` of a sleeping container, each in
a guest of its own cloned from the template), all left running, then deleted: the time of
each start, and the host memory all of them hold together. One run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun.busybox import make_busybox_bundle

VMRUN = [sys.executable, "-m", "vmrun.cli"]
COUNT = int(os.environ.get("SANDBOXES", "20"))


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-row", dir="/tmp"))
    config = work / "vmrun.toml"
    config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\ntemplate = ""\n')
    env = {**os.environ, "VMRUN_CONFIG": str(config)}
    cli = [*VMRUN, "--root", str(work / "state")]
    started: list[str] = []
    try:
        bundle = make_busybox_bundle(work / "bundle", ["sleep", "3600"])
        subprocess.run([*VMRUN, "template", "create"], env=env, check=True, capture_output=True)
        config.write_text(config.read_text().replace('template = ""', 'template = "default"'))
        before = available_mib()
        times = []
        for i in range(COUNT):
            name = f"s{i:02d}"
            t0 = time.monotonic()
            subprocess.run([*cli, "create", "--bundle", str(bundle), name], env=env, check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(name)
            subprocess.run([*cli, "start", name], env=env, check=True)
            times.append(time.monotonic() - t0)
            print(f"sandbox {i + 1:>2}: {times[-1]:.3f} s", flush=True)
        held = before - available_mib()
        print(f"\n{COUNT} sandboxes in {sum(times):.1f} s: median {sorted(times)[len(times) // 2]:.3f} s, "
              f"first {times[0]:.3f} s, last {times[-1]:.3f} s; host memory held: {held:.0f} MiB "
              f"({held / COUNT:.0f} MiB each)")
        return 0
    finally:
        for name in started:
            subprocess.run([*cli, "delete", "--force", name], env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
