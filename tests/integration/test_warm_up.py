"""The agent's warm-up container (vmrun/agent/warm_up.py): under TCG a booted guest runs it
as the agent starts and a clone as it is resumed, once; it leaves nothing in the guest.
With KVM there is none."""

from __future__ import annotations

import json
import time

import pytest

from vmrun.hypervisor.accel import detect_acceleration
from vmrun.sandbox import vm_dir_for

pytestmark = pytest.mark.integration

RAN = b"warm-up container ran in"


def console_of(env, sandbox_id: str):
    return vm_dir_for(env.config(), sandbox_id) / "console.log"


def wait_for_console(console, text: bytes, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = console.read_bytes() if console.exists() else b""
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not on the guest's console: {log[-2000:]!r}")


def check_warm_up(env, name: str) -> None:
    """Create a container that sees the guest's whole cgroup tree, and look at the guest."""
    bundle = env.bundle(name, ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "cgroup"]
    (bundle / "config.json").write_text(json.dumps(spec))
    created = env.vmrun("create", "--bundle", str(bundle), name, detached=True)
    assert created.returncode == 0
    try:
        console = console_of(env, name)
        translates = detect_acceleration(env.config().acceleration, env.config().run_dir).translates
        if not translates:
            time.sleep(2)
            assert b"warm-up container" not in console.read_bytes()
            return
        log = wait_for_console(console, RAN)
        assert log.count(b"warm-up container") == 1, log[-2000:]
        assert env.vmrun("start", name).returncode == 0
        cgroups = env.vmrun("exec", name, "ls", "/sys/fs/cgroup")
        assert cgroups.returncode == 0, cgroups.stderr
        # The sandbox's containers are under vmrun/; the warm-up's own cgroup is gone.
        assert b"vmrun\n" in cgroups.stdout and b"vmrun-warm-up" not in cgroups.stdout
        assert console.read_bytes().count(b"warm-up container") == 1
    finally:
        assert env.vmrun("delete", "--force", name).returncode == 0


def test_a_booted_guest_runs_the_warm_up_container_once(vm_env):
    check_warm_up(vm_env, "warm-boot")


def test_a_clone_runs_the_warm_up_container_once_resumed(vm_env):
    vm_env.use_templates()
    created = vm_env.vmrun("template", "create")
    assert created.returncode == 0, created.stderr
    check_warm_up(vm_env, "warm-clone")
