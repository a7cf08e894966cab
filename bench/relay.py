#!/usr/bin/env python3
"""Throughput of a container's stdio through vmrun: MiB of random bytes piped through
`vmrun run … cat` (host -> guest -> host, sha256 checked), and the guest's output alone
(`dd` of zeros to the container's stdout, the host discarding it), and through `cat` again
with stdin a pipe, as a shell pipeline gives it. A `vmrun run` of
/bin/true is timed alongside: its start and teardown are in each figure.

    python3 bench/relay.py [MiB]        (default 100)
"""

from __future__ import annotations

import hashlib
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


def main() -> int:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    base = Path(tempfile.mkdtemp(prefix="vrelay", dir="/tmp"))
    try:
        config = base / "vmrun.toml"
        config.write_text(f'run_dir = "{base}/run"\ntemplates_dir = "{base}/templates"\nboot_timeout = 120\n')
        env = {**os.environ, "VMRUN_CONFIG": str(config)}
        subprocess.run([*VMRUN, "template", "create"], env=env, check=True, capture_output=True)
        cli = [*VMRUN, "--root", str(base / "state")]

        def run(name: str, args: list[str], stdin, stdout) -> float:
            bundle = make_busybox_bundle(base / "bundles" / name, args)
            started = time.monotonic()
            result = subprocess.run([*cli, "run", "--bundle", str(bundle), name], env=env, stdin=stdin,
                                    stdout=stdout, stderr=subprocess.PIPE)
            if result.returncode != 0:
                failed = keep_failed_logs(base / "run", "vrelay-failed-")
                raise SystemExit(f"vmrun run {name}: {result.stderr.decode().strip()} (logs kept in {failed})")
            return time.monotonic() - started

        empty = run("true", ["true"], subprocess.DEVNULL, subprocess.DEVNULL)
        data = os.urandom(mib << 20)
        (base / "in").write_bytes(data)
        with open(base / "in", "rb") as stdin, open(base / "out", "wb") as stdout:
            through = run("cat", ["cat"], stdin, stdout)
        intact = hashlib.sha256((base / "out").read_bytes()).digest() == hashlib.sha256(data).digest()
        # As a shell pipeline feeds it: stdin a pipe (64 KiB unless widened), not a file.
        with subprocess.Popen(["cat", str(base / "in")], stdout=subprocess.PIPE) as feeder, \
                open(base / "out", "wb") as stdout:
            piped = run("cat-piped", ["cat"], feeder.stdout, stdout)
        intact = intact and hashlib.sha256((base / "out").read_bytes()).digest() == hashlib.sha256(data).digest()
        out_only = run("out", ["dd", "if=/dev/zero", "bs=1M", f"count={mib}"], subprocess.DEVNULL,
                       subprocess.DEVNULL)
        print(f"vmrun run true: {empty:.2f} s")
        print(f"{mib} MiB through cat (host -> guest -> host): {through:.2f} s, "
              f"{mib * 1.048576 / max(through - empty, 0.001):.1f} MB/s without the run's start; "
              f"sha256 {'ok' if intact else 'MISMATCH'}")
        print(f"{mib} MiB through cat, stdin a pipe: {piped:.2f} s, "
              f"{mib * 1.048576 / max(piped - empty, 0.001):.1f} MB/s without the run's start")
        print(f"{mib} MiB out of the guest: {out_only:.2f} s, "
              f"{mib * 1.048576 / max(out_only - empty, 0.001):.1f} MB/s without the run's start")
        return 0 if intact else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
