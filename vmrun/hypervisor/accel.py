"""Choose KVM or TCG: KVM only where it really runs ordinary guests.

The answer for `auto` is cached per host boot (keyed by the kernel's boot_id) under the
run dir, so the probe's cost is paid once, not on every container start.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrun.common.files import write_json_atomic
from vmrun.errors import CommandError, ConfigError
from vmrun.proc import run

_PROBE_TIMEOUT = 2.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Acceleration:
    name: str  # "kvm" or "tcg"
    reason: str

    @property
    def translates(self) -> bool:
        """Whether guest code runs only once QEMU has translated it (TCG)."""
        return self.name == "tcg"


def _kvm_verdict() -> Acceleration:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Acceleration("tcg", "/dev/kvm is missing or not accessible")
    modules = Path("/sys/module")
    # A PVM host runs only PVM-aware guest kernels: ordinary guests hang there.
    if (modules / "kvm_pvm").exists() and not any((modules / m).exists() for m in ("kvm_intel", "kvm_amd")):
        return Acceleration("tcg", "/dev/kvm is PVM (kvm_pvm), which cannot run an ordinary guest kernel")
    try:
        run([sys.executable, "-m", "vmrun.hypervisor.kvm_probe"], timeout=_PROBE_TIMEOUT)
    except CommandError as exc:
        return Acceleration("tcg", f"a test guest on /dev/kvm did not run: {exc}")
    return Acceleration("kvm", "/dev/kvm runs guests")


def detect_acceleration(setting: str, cache_dir: Path) -> Acceleration:
    """The acceleration to use for `setting` ("auto", "kvm" or "tcg")."""
    if setting == "tcg":
        return Acceleration("tcg", "configured")
    if setting == "kvm":
        return Acceleration("kvm", "configured")
    if setting != "auto":
        raise ConfigError(f"unknown acceleration {setting!r}")
    boot_id = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    cache = cache_dir / "acceleration.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id and boot_id:
            return Acceleration(cached["name"], cached["reason"])
    except (OSError, ValueError, KeyError):
        pass
    verdict = _kvm_verdict()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"boot_id": boot_id, **asdict(verdict)})
    except OSError:
        pass  # an unwritable cache only costs the probe next time
    return verdict
