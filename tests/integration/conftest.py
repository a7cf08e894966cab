"""Fixtures for tests that boot real guests with real QEMU (TCG here, KVM where it works).

Each test gets a private run dir, state root and config; afterwards it checks that
nothing it started is left: no process naming its run dir, no mount, no state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from leftovers import mounts_under, processes_mentioning
from vmrun.busybox import make_busybox_bundle
from vmrun.config import Config

@dataclass
class Env:
    base: Path
    config_path: Path
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "VMRUN_CONFIG": str(self.config_path)}

    def config(self) -> Config:
        from vmrun.config import load_config

        return load_config(self.config_path)

    def bundle(self, name: str, args: list[str], **kwargs) -> Path:
        return make_busybox_bundle(self.base / "bundles" / name, args, **kwargs)

    def use_templates(self) -> None:
        """Templating as configured by default, with templates in the test's private dir."""
        templates = self.base / "templates"
        self.config_path.write_text(self.config_path.read_text().replace('template = ""\n', "")
                                    + f'templates_dir = "{templates}"\n')

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "vmrun.cli", "--root", str(self.root)]

    def vmrun(self, *args: str, input: bytes | None = None, timeout: float = 180, detached: bool = False,
              **kwargs):
        """Run the CLI. `detached`: it leaves a shim holding its stdio, so capture nothing."""
        if "stdin" not in kwargs and input is None:
            kwargs["stdin"] = subprocess.DEVNULL
        if detached:
            kwargs.update(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            kwargs["capture_output"] = True
        return subprocess.run([*self.cli(), *args], input=input, timeout=timeout, env=self.env, **kwargs)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.cli(), *args], env=self.env, **kwargs)


@pytest.fixture
def vm_env(guest_image):
    # Short paths: unix sockets live under the run dir.
    base = Path(tempfile.mkdtemp(prefix="vmrun-t", dir="/tmp"))
    run_dir = base / "run"
    config_path = base / "vmrun.toml"
    # Cold boots here (templating, the default, has its own tests and the client tests).
    config_path.write_text(f'run_dir = "{run_dir}"\nboot_timeout = 120\ntemplate = ""\n')
    env = Env(base, config_path, base / "state")
    yield env
    deadline = time.monotonic() + 10
    while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = processes_mentioning(str(run_dir))
    mounts = mounts_under(str(base))
    vm_dirs = [p for sub in ("vm", "daemon-logs", "netns") if (run_dir / sub).exists() for p in (run_dir / sub).iterdir()]
    states = list(env.root.iterdir()) if env.root.exists() else []
    for line in leftovers:
        os.kill(int(line.split(":")[0]), 9)
    for point in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    if not mounts:
        shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, f"processes left behind: {leftovers}"
    assert not mounts, f"mounts left behind: {mounts}"
    assert not vm_dirs, f"sandbox dirs left behind: {vm_dirs}"
    assert not states, f"state left behind: {states}"
