#!/usr/bin/env python3
"""Wall time of `vmrun run` of /bin/true, cold boot and cloned from a template, beside
`runc run` of the same bundle, and where vmrun's time goes.

The template is made first in a private directory (its time is printed too). Then
ROUNDS rounds (default 15) each run runc, a cold boot and a clone, one after the other, so
that the machine's ups and downs touch all of them alike; medians are compared. Single
clones vary by 10 % here; with nine rounds the ratio still moved by 5 % between runs.
vmrun's phases come from its --debug timings lines (medians per phase).
"""

from __future__ import annotations

import json
import statistics
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kept_failures import keep_failed_logs
from vmrun.busybox import make_busybox_bundle

VMRUN = [sys.executable, "-m", "vmrun.cli"]
ROUNDS = int(os.environ.get("ROUNDS", "15"))


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
                  ("guest kernel + /init", p.get("guest_agent_started", 0.0))]
        if "guest_serving" in p:  # the agent's own milestones (vmrun/agent/server.py)
            steps += [("agent: Python, its imports", p["guest_agent_main"] - p["guest_agent_started"]),
                      ("agent: gRPC and the service load", p["guest_grpc_loaded"] - p["guest_agent_main"]),
                      ("agent: serving (modules waited for)", p["guest_serving"] - p["guest_grpc_loaded"]),
                      ("agent: READY said", guest - p["guest_serving"])]
        else:
            steps += [("agent start (Python, grpc)", guest - p.get("guest_agent_started", 0.0))]
    steps += [
        ("sandbox setup (virtio-fs mount)", p["sandbox_created"] - p["agent_ready"]),
        ("container create + start (crun run)", p["container_started"] - p["sandbox_created"]),
        ("/bin/true runs, output drained", p["container_exited"] - p["container_started"]),
        ("teardown", p["torn_down"] - p["container_exited"]),
    ]
    return steps


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0] if all(key in r for r in runs)}


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-bench", dir="/tmp"))
    try:
        bundle = make_busybox_bundle(work / "bundle", ["/bin/true"])
        configs = {}
        for name, template in (("cold boot", ""), ("from template", "default")):
            config = configs[name] = work / f"vmrun-{template or 'cold'}.toml"
            config.write_text(f'run_dir = "{work}/run"\ntemplates_dir = "{work}/templates"\ntemplate = "{template}"\n')
        seconds, made = timed([*VMRUN, "template", "create"], {**os.environ, "VMRUN_CONFIG": str(configs["from template"])})
        print(f"vmrun template create: {seconds:.3f} s (rc {made.returncode})")
        if made.returncode != 0:
            print(made.stderr.decode(), file=sys.stderr)
            return made.returncode

        runc = shutil.which("runc")
        if runc:
            timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle), "warmup"])
        walls: dict[str, list[float]] = {"runc run": [], "cold boot": [], "from template": []}
        phases: dict[str, list[dict[str, float]]] = {"cold boot": [], "from template": []}
        for round_ in range(ROUNDS):
            if runc:
                seconds, result = timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle),
                                         f"r{round_}"])
                walls["runc run"].append(seconds)
            for name, config in configs.items():
                log = work / f"{round_}-{len(phases[name])}.log"
                seconds, result = timed([*VMRUN, "--root", str(work / "state"), "--debug", "--log", str(log),
                                         "--log-format", "json", "run", "--bundle", str(bundle), f"v{round_}"],
                                        {**os.environ, "VMRUN_CONFIG": str(config)})
                if result.returncode != 0:
                    kept = keep_failed_logs(work / "run", "vrun-true-failed-", log)
                    print(f"vmrun run ({name}) failed: {result.stderr.decode().strip()} (logs kept in {kept})",
                          file=sys.stderr)
                    return result.returncode
                walls[name].append(seconds)
                phases[name].append(vmrun_phases(log))

        print(f"\n{'command':<28}{'median s':>9}   each run")
        for name, times in walls.items():
            if times:
                label = name if name == "runc run" else f"vmrun run ({name})"
                print(f"{label:<28}{statistics.median(times):>9.3f}   " + " ".join(f"{t:.3f}" for t in times))
        cold, clone = statistics.median(walls["cold boot"]), statistics.median(walls["from template"])
        print(f"\nfrom template / cold boot (medians of {ROUNDS}): {clone / cold:.3f}x")
        for name, runs in phases.items():
            wall = statistics.median(walls[name])
            print(f"\nwhere `vmrun run` ({name}) spends its time (median phases):")
            median = median_phases(runs)
            for step, secs in breakdown(wall, median):
                print(f"  {step:<38}{secs:>8.3f}")
            if name == "cold boot" and "guest_modules_loaded" in median:
                # /init loads them while the agent starts; the agent waits for them before vsock.
                print(f"  (kernel modules all loaded, in the background, at {median['guest_modules_loaded']:.3f} s"
                      " of guest uptime)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
