#!/usr/bin/env python3
"""Wall time of `vmrun run` of /bin/true (cold boot) beside `runc run`, and where it goes.

One run of each (after one warm-up of runc), printed as a table. vmrun's phases come from
its --debug timings line: helpers started, QEMU started, agent ready, sandbox created,
container created/started/exited, torn down.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun.busybox import make_busybox_bundle


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True)
    return time.monotonic() - start, result


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmrun-bench"))
    try:
        bundle = make_busybox_bundle(work / "bundle", ["/bin/true"])
        rows = []
        runc = shutil.which("runc")
        if runc:
            timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle), "warmup"])
            seconds, result = timed([runc, "--root", str(work / "runc"), "run", "--bundle", str(bundle), "b1"])
            rows.append(("runc run", seconds, result.returncode))
        log = work / "vmrun.log"
        seconds, result = timed([sys.executable, "-m", "vmrun.cli", "--root", str(work / "vmrun"), "--debug",
                                 "--log", str(log), "--log-format", "json", "run", "--bundle", str(bundle), "b2"])
        rows.append(("vmrun run (cold boot)", seconds, result.returncode))
        print(f"{'command':<28}{'wall s':>8}{'rc':>5}")
        for name, secs, rc in rows:
            print(f"{name:<28}{secs:>8.3f}{rc:>5}")
        phases: dict[str, float] = {}
        for line in log.read_text().splitlines():
            msg = json.loads(line)["msg"]
            if msg.startswith(("timings ", "guest timings ")):
                phases.update({k: float(v) for k, v in (kv.split("=") for kv in msg.split() if "=" in kv)})
        if "torn_down" in phases:
            p = phases
            guest_boot = p.get("guest_uptime", 0.0)
            steps = [
                ("vmrun start-up and exit (Python)", seconds - p["torn_down"]),
                ("virtiofsd + vsock backend", p["helpers_started"]),
                ("QEMU start (to QMP)", p["qemu_started"] - p["helpers_started"]),
                ("firmware, before the kernel clock", p["agent_ready"] - p["qemu_started"] - guest_boot),
                ("guest kernel + /init", p.get("guest_agent_started", 0.0)),
                ("agent start (Python, grpc)", guest_boot - p.get("guest_agent_started", 0.0)),
                ("sandbox setup (virtio-fs mount)", p["sandbox_created"] - p["agent_ready"]),
                ("container create (crun)", p["container_created"] - p["sandbox_created"]),
                ("container start", p["container_started"] - p["container_created"]),
                ("/bin/true runs, output drained", p["container_exited"] - p["container_started"]),
                ("teardown", p["torn_down"] - p["container_exited"]),
            ]
            print("\nwhere vmrun's time goes:")
            for name, secs in steps:
                print(f"  {name:<36}{secs:>8.3f}")
        if result.returncode != 0:
            print(result.stderr.decode(), file=sys.stderr)
        return result.returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
