"""What a guest makes its host helpers do counts against its pod: QEMU, virtiofsd, the
vsock backend and the daemon holding them run in the cgroup the pod's spec names, and
that cgroup goes with the pod."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
from leftovers import scan_processes, wait_for


def hierarchies() -> list[Path]:
    """Where the host's cgroup hierarchies are mounted."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [Path(line.split(" ")[4]) for line in lines if line.split(" - ")[1].split(" ")[0] in ("cgroup", "cgroup2")]


def cgroups_of(pid: int) -> set[str]:
    """The cgroup `pid` is in, in each hierarchy."""
    return {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()}


def helpers_of(vm_dir: Path) -> dict[str, int]:
    found = {}
    for pid, cmdline in scan_processes(str(vm_dir)):
        for kind in ("qemu-system", "virtiofsd", "vsock.vhost_user", "sandbox_daemon"):
            if kind in cmdline:
                found[kind] = pid
    return found


@pytest.fixture
def test_parent():
    """A parent cgroup of the test's own, removed afterwards in every hierarchy."""
    name = f"vmrtest{secrets.token_hex(4)}"
    yield name
    for root in hierarchies():
        for top in (root / name, root / f"{name}.slice"):  # cgroupfs style, systemd style
            for leftover in sorted(top.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                leftover.rmdir()


@pytest.mark.parametrize("style", ["cgroupfs", "systemd"])
def test_a_pods_helpers_run_in_its_cgroup_which_goes_with_it(vm_env, test_parent, style):
    if style == "cgroupfs":
        given, expected = f"/{test_parent}/pod", f"/{test_parent}/pod"
    else:
        given, expected = f"{test_parent}.slice:vmrun:pod", f"/{test_parent}.slice/vmrun-pod.scope"
    bundle = bundle_in_cgroup(vm_env, "pod", given, ["sleep", "600"])
    pid_file = vm_env.base / "pod.pid"
    assert vm_env.vmrun("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "pod",
                        detached=True).returncode == 0
    check_helpers_in(vm_env, expected)
    # The shim, the pid its caller sees, counts there too; so does an exec's.
    assert cgroups_of(int(pid_file.read_text())) == {expected}
    assert vm_env.vmrun("start", "pod").returncode == 0
    exec_pid = vm_env.base / "exec.pid"
    assert vm_env.vmrun("exec", "--detach", "--pid-file", str(exec_pid), "pod", "sleep", "600",
                        detached=True).returncode == 0
    assert cgroups_of(int(exec_pid.read_text())) == {expected}
    assert vm_env.vmrun("delete", "--force", "pod").returncode == 0
    assert not any((root / expected.lstrip("/")).exists() for root in hierarchies())


def test_a_pod_members_shim_runs_in_the_members_cgroup(vm_env, test_parent):
    pod_cgroup, member_cgroup = f"/{test_parent}/pod/sandbox", f"/{test_parent}/pod/member"
    sandbox = bundle_in_cgroup(vm_env, "sandbox", pod_cgroup, ["sleep", "600"],
                               {"io.kubernetes.cri.container-type": "sandbox"})
    member = bundle_in_cgroup(vm_env, "member", member_cgroup, ["sleep", "600"],
                              {"io.kubernetes.cri.container-type": "container",
                               "io.kubernetes.cri.sandbox-id": "sandbox"})
    try:
        assert vm_env.vmrun("create", "--bundle", str(sandbox), "sandbox", detached=True).returncode == 0
        pid_file = vm_env.base / "member.pid"
        assert vm_env.vmrun("create", "--bundle", str(member), "--pid-file", str(pid_file), "member",
                            detached=True).returncode == 0
        assert cgroups_of(int(pid_file.read_text())) == {member_cgroup}
        check_helpers_in(vm_env, pod_cgroup)  # the guest's helpers stay the pod's
        assert vm_env.vmrun("delete", "--force", "member").returncode == 0
        assert not any((root / member_cgroup.lstrip("/")).exists() for root in hierarchies())
    finally:
        for name in ("member", "sandbox"):
            vm_env.vmrun("delete", "--force", name)
    assert not any((root / pod_cgroup.lstrip("/")).exists() for root in hierarchies())


def test_vmrun_runs_helpers_in_the_cgroup_too(vm_env, test_parent):
    expected = f"/{test_parent}/run"
    bundle = bundle_in_cgroup(vm_env, "run", expected, ["sh", "-c", "echo up; sleep 600"])
    run = vm_env.popen("run", "--bundle", str(bundle), "run", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert run.stdout.readline() == b"up\n"
        check_helpers_in(vm_env, expected)
    finally:
        vm_env.vmrun("kill", "run", "KILL")
        run.wait(60)
        run.stdout.close()
    assert not any((root / expected.lstrip("/")).exists() for root in hierarchies())


def bundle_in_cgroup(vm_env, name: str, cgroups_path: str, args: list[str], annotations: dict | None = None) -> Path:
    bundle = vm_env.bundle(name, args)
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["cgroupsPath"] = cgroups_path
    if annotations:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def check_helpers_in(vm_env, expected: str) -> None:
    [vm_dir] = (vm_env.base / "run" / "vm").iterdir()
    helpers = wait_for(lambda: (h := helpers_of(vm_dir)) and len(h) >= 3 and h, message="the helpers")
    assert {"qemu-system", "virtiofsd", "vsock.vhost_user"} <= set(helpers), helpers
    for kind, pid in helpers.items():
        assert cgroups_of(pid) == {expected}, kind
