"""The agent's warm-up container (vmrun/agent/warm_up.py): under TCG, with a vCPU to spare, a
booted guest runs it as the agent starts and a clone as it is resumed, once; it leaves
nothing in the guest. With KVM or one vCPU there is none."""

from __future__ import annotations

import json
import time

import pytest
from leftovers import clone_memory_of

from vmrun.hypervisor.accel import detect_acceleration
from vmrun.hypervisor.templates import TemplateDefinition
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


def check_warm_up(env, name: str, cloned: bool, vcpus: int) -> None:
    """Create a container that sees the guest's whole cgroup tree, and look at the guest."""
    translated = detect_acceleration(env.config().acceleration, env.config().run_dir).translates
    expected = translated and vcpus > 1
    bundle = env.bundle(name, ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "cgroup"]
    (bundle / "config.json").write_text(json.dumps(spec))
    created = env.vmrun("create", "--bundle", str(bundle), name, detached=True)
    assert created.returncode == 0
    try:
        # A clone (its QEMU holds a copy of the template's RAM), not a guest booted because
        # cloning failed.
        assert (clone_memory_of(vm_dir_for(env.config(), name)) is not None) == cloned
        console = console_of(env, name)
        if expected:
            wait_for_console(console, RAN)
        assert env.vmrun("start", name).returncode == 0
        cgroups = env.vmrun("exec", name, "ls", "/sys/fs/cgroup")
        assert cgroups.returncode == 0, cgroups.stderr
        # The sandbox's containers are under vmrun/; no warm-up cgroup is left.
        assert b"vmrun\n" in cgroups.stdout and b"vmrun-warm-up" not in cgroups.stdout
        # Once, or (with KVM, or one vCPU) never: by now the agent is long past it.
        log = console.read_bytes()
        assert log.count(b"warm-up container") == (1 if expected else 0), log[-2000:]
    finally:
        assert env.vmrun("delete", "--force", name).returncode == 0


def test_a_booted_guest_with_two_vcpus_runs_the_warm_up_container_once(vm_env):
    vm_env.config_path.write_text(vm_env.config_path.read_text() + "vcpus = 2\n")
    check_warm_up(vm_env, "warm-boot", cloned=False, vcpus=2)


def test_a_booted_guest_with_one_vcpu_runs_none(vm_env):
    assert vm_env.config().vcpus == 1  # booted guests' default
    check_warm_up(vm_env, "warm-boot1", cloned=False, vcpus=1)


def test_a_clone_runs_the_warm_up_container_once_resumed(vm_env):
    vm_env.use_templates()
    created = vm_env.vmrun("template", "create")
    assert created.returncode == 0, created.stderr
    check_warm_up(vm_env, "warm-clone", cloned=True, vcpus=TemplateDefinition.load("default").vcpus)
