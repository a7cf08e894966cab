"""Sustained traffic both ways over the guest's vsock, several pods at once, hundreds of
times: no run may hang. A wedged data path once stopped a guest's vsock under sustained
container output (the guest: "tx:id 2 is not a head!", from the vsock backend's used-idx
store passing through 0, since fixed: docs/performance.md); this is the soak that would show it.

VMRUN_STRESS_RUNS (default 300) runs, VMRUN_STRESS_PODS (default 3) at a time, each a
clone that takes 1 MiB on stdin and writes 2 MiB to stdout and 256 KiB to stderr; one
that does not end within VMRUN_STRESS_TIMEOUT seconds (default 120) counts as a hang.
Prints the figures (runs, hangs, failures, seconds per run: median and worst)."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.stress]

RUNS = int(os.environ.get("VMRUN_STRESS_RUNS", "300"))
PODS = int(os.environ.get("VMRUN_STRESS_PODS", "3"))
TIMEOUT = float(os.environ.get("VMRUN_STRESS_TIMEOUT", "120"))
_INPUT = os.urandom(1 << 20)
# Echo stdin's digest, then sustained output on both streams.
_SCRIPT = ("md5sum; head -c 2097152 /dev/zero | tr '\\0' 'o'; head -c 262144 /dev/zero | tr '\\0' 'e' >&2")


def test_no_run_hangs_under_sustained_traffic(vm_env):
    vm_env.use_templates()
    bundle = vm_env.bundle("soak", ["sh", "-c", _SCRIPT])
    expected_digest = hashlib.md5(_INPUT).hexdigest()

    def one(index: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            result = vm_env.vmrun("run", "--bundle", str(bundle), f"soak{index}", input=_INPUT, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"\nsoak{index} hung:\n{_evidence(vm_env, f'soak{index}')}")
            vm_env.vmrun("delete", "--force", f"soak{index}", timeout=60)
            return "hang", time.monotonic() - started
        took = time.monotonic() - started
        out = result.stdout
        ok = (result.returncode == 0 and out.startswith(expected_digest.encode()) and out.count(b"o") >= 2097152
              and result.stderr.count(b"e") >= 262144)
        return ("ok" if ok else f"failed rc={result.returncode} {result.stderr[-200:]!r}"), took

    with ThreadPoolExecutor(PODS) as pool:
        outcomes = list(pool.map(one, range(RUNS)))
    hangs = [o for o in outcomes if o[0] == "hang"]
    failures = [o for o in outcomes if o[0] not in ("ok", "hang")]
    times = [took for _, took in outcomes]
    print(f"\nsoak: {RUNS} runs, {PODS} at a time: {len(hangs)} hangs, {len(failures)} failures; "
          f"seconds per run: median {statistics.median(times):.2f}, worst {max(times):.2f}")
    assert not hangs, f"{len(hangs)} of {RUNS} runs hung"
    assert not failures, failures[:5]


def _evidence(vm_env, container_id: str) -> str:
    """The last lines of each log of the hung run's sandbox, before delete removes them."""
    from vmrun.sandbox import vm_dir_for

    vm_dir = vm_dir_for(vm_env.config(), container_id)
    parts = []
    for name in ("console.log", "qemu.log", "virtiofsd.log", "vsock-backend.log"):
        path = vm_dir / name
        lines = path.read_text(errors="replace").splitlines()[-15:] if path.is_file() else ["(none)"]
        parts.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(parts)
