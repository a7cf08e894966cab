"""The guest is sized from the spec: a container's memory limit and CPU quota become guest
memory (virtio-mem) and vCPUs (ACPI hot-plug), added after boot, so booted guests and
template clones alike grow; `vmrun update` grows a running guest further."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.integration

_GIB = 1 << 30
_MIB = 1 << 20
_PROBE = "grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo; nproc"


def sized_bundle(vm_env, name: str, memory: int, quota: int, period: int):
    bundle = vm_env.bundle(name, ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"].setdefault("resources", {})
    spec["linux"]["resources"]["memory"] = {"limit": memory}
    spec["linux"]["resources"]["cpu"] = {"quota": quota, "period": period}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def guest_size(vm_env, container_id: str) -> tuple[int, int, int]:
    """(MemTotal in bytes, processors in /proc/cpuinfo, nproc) as the container sees them."""
    probe = vm_env.vmrun("exec", container_id, "sh", "-c", _PROBE)
    assert probe.returncode == 0, probe.stderr
    meminfo, processors, nproc = probe.stdout.decode().split("\n")[:3]
    return int(meminfo.split()[1]) * 1024, int(processors), int(nproc)


def check_sized_and_growing(vm_env, name: str) -> None:
    bundle = sized_bundle(vm_env, name, memory=2 * _GIB, quota=300000, period=100000)
    created = vm_env.vmrun("create", "--bundle", str(bundle), name, detached=True)
    try:
        assert created.returncode == 0
        assert vm_env.vmrun("start", name).returncode == 0
        memory, processors, nproc = guest_size(vm_env, name)
        assert memory >= 1.9 * _GIB, memory
        assert processors >= 3 and nproc >= 3, (processors, nproc)

        update = vm_env.vmrun("update", "--memory", str(3 * _GIB), name)
        assert update.returncode == 0, update.stderr
        grown, _, _ = guest_size(vm_env, name)
        assert grown >= memory + 1000 * _MIB, (memory, grown)

        # Grow only: a lower limit leaves the guest as it is.
        lowered = vm_env.vmrun("update", "--memory", str(256 * _MIB), "--cpu-quota", "100000", name)
        assert lowered.returncode == 0, lowered.stderr
        assert guest_size(vm_env, name)[0] == grown
    finally:
        vm_env.vmrun("delete", "--force", name)


def test_a_booted_guest_fits_its_container(vm_env):
    check_sized_and_growing(vm_env, "sized-boot")


def test_a_template_clone_fits_its_container(vm_env):
    vm_env.use_templates()
    check_sized_and_growing(vm_env, "sized-clone")


def test_vcpus_beyond_the_maximum_are_capped_with_a_warning(vm_env):
    vm_env.use_templates()
    bundle = sized_bundle(vm_env, "capped", memory=256 * _MIB, quota=64 * 100000, period=100000)
    stderr = vm_env.base / "create.err"
    with open(stderr, "wb") as err:
        # The shim keeps the create's stdio: to files, not pipes that would never close.
        created = subprocess.run([*vm_env.cli(), "create", "--bundle", str(bundle), "capped"], env=vm_env.env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=180)
    try:
        assert created.returncode == 0, stderr.read_text()
        assert "it gets its maximum, 8" in stderr.read_text()
        assert vm_env.vmrun("start", "capped").returncode == 0
        _, processors, nproc = guest_size(vm_env, "capped")
        assert processors == nproc == 8  # the template's max_vcpus
    finally:
        vm_env.vmrun("delete", "--force", "capped")


def test_vmrun_run_sizes_its_guest_too(vm_env):
    vm_env.use_templates()
    bundle = sized_bundle(vm_env, "runsized", memory=2 * _GIB, quota=300000, period=100000)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["sh", "-c", _PROBE]
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "runsized")
    assert result.returncode == 0, result.stderr
    meminfo, processors, nproc = result.stdout.decode().split("\n")[:3]
    assert int(meminfo.split()[1]) * 1024 >= 1.9 * _GIB and int(processors) >= 3 and int(nproc) >= 3, result.stdout
