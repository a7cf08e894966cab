#!/usr/bin/env python3
"""Wall time of `vmrun run` of /bin/true, cold boot and cloned from a template, beside
`runc run` of the same bundle, and where vmrun's time goes. One run of each.

The template is made first in a private directory (its time is printed too). vmrun's
phases come from its --debug timings lines.
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

VMRUN = [sys.executable, "-m", "vmrun.cli"]


def timed(argv: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, env=env)
    return time.monotonic() - start, result


def vmrun_phases(log: Path) -> dict[str, float]:
    phases: dict[str, float] = {}
    for line in log.read_text().splitlines():
        msg = json.loads(line)["msg"]
        if msg.startswith(("timings ", "guest timings ")):
            phases.update({k: float(v) for k, v in (kv.split("=") for kv in msg.split() if "=" in kv)})
    return phases


def breakdown(wall: float, p: dict[str, float]) -> list[tuple[str, float]]:
    guest = p.get("guest_uptime", 0.0)
    cloned = "clone_restored" in p
    steps = [("vmrun start-up and exit (Python)", wall - p["torn_down"])]
    if cloned:
        # The helpers start while the RAM is copied and QEMU restores: one step.
        restored = max(p["helpers_started"], p["clone_restored"])
        steps += [("helpers ‖ RAM copy, QEMU start, restore", restored),
                  ("hot-plug, resume, agent ready", p["agent_ready"] - restored)]
    else:
        steps += [("virtiofsd + vsock backend", p["helpers_started"]),
                  ("QEMU start (to QMP)", p["qemu_started"] - p["helpers_started"]),
                  ("firmware, before the kernel clock", p["agent_ready"] - p["qemu_started"] - guest),
                  ("guest kernel + /init", p.get("guest_agent_started", 0.0)),
                  ("agent start (Python, grpc)", guest - p.get("guest_agent_started", 0.0))]
    steps += [
        ("sandbox setup (virtio-fs mount)", p["sandbox_created"] - p["agent_ready"]),
        ("container create + start (crun run)", p["container_started"] - p["sandbox_created"]),
        ("/bin/true runs, output drained", p["container_exited"] - p["container_started"]),
        ("teardown", p["torn_down"] - p["container_exited"]),
    ]
    return steps


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-bench", dir="/tmp"))
    try:
        bundle = make_busybox_bundle(work / "bundle", ["/bin/true"])
        config = work / "vmrun.toml"
        config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\ntemplate = ""\n')
        env = {**os.environ, "VMRUN_CONFIG": str(config)}
        rows: list[tuple[str, float, int]] = []
        runc = shutil.which("runc")
        if runc:
            timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle), "warmup"])
            seconds, result = timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle), "b1"])
            rows.append(("runc run", seconds, result.returncode))

        runs = {}
        for name, vmrun_id in (("cold boot", "cold"), ("from template", "clone")):
            if name == "from template":
                seconds, made = timed([*VMRUN, "template", "create"], env)
                rows.append(("vmrun template create", seconds, made.returncode))
                config.write_text(config.read_text().replace('template = ""', 'template = "default"'))
            log = work / f"{vmrun_id}.log"
            seconds, result = timed([*VMRUN, "--root", str(work / "state"), "--debug", "--log", str(log),
                                     "--log-format", "json", "run", "--bundle", str(bundle), vmrun_id], env)
            rows.append((f"vmrun run ({name})", seconds, result.returncode))
            if result.returncode != 0:
                print(result.stderr.decode(), file=sys.stderr)
                return result.returncode
            runs[name] = (seconds, vmrun_phases(log))

        print(f"{'command':<30}{'wall s':>8}{'rc':>5}")
        for name, secs, rc in rows:
            print(f"{name:<30}{secs:>8.3f}{rc:>5}")
        cold, clone = runs["cold boot"][0], runs["from template"][0]
        print(f"\nfrom template / cold boot: {clone / cold:.2f}x")
        for name, (wall, phases) in runs.items():
            print(f"\nwhere `vmrun run` ({name}) spends its time:")
            for step, secs in breakdown(wall, phases):
                print(f"  {step:<38}{secs:>8.3f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
