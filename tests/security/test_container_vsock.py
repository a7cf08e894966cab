"""Only the agent talks to the host over vsock: no container process, ordinary or the
attacker's, whatever its own seccomp profile, gets an AF_VSOCK socket in any way
(vmrun/agent/vsock_guard.py). The probe (vsock_probe.c, built static here) tries each way
and prints one line per way."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from attacker import IN_GUEST_ROOT, attacker_bundle

PROBE_SOURCE = Path(__file__).with_name("vsock_probe.c")
# Every way the probe tries; each must fail with EPERM.
WAYS = ("socket", "socket-high-bits", "i386-socket", "i386-socketcall", "io_uring-socket")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc and libc6-dev build the vsock probe: install them")
    binary = tmp_path_factory.mktemp("probe") / "vsock-probe"
    # Static (busybox's rootfs has no libc), no PIE: its data below 4 GiB for the 32-bit calls.
    subprocess.run([gcc, "-static", "-no-pie", "-O2", "-o", str(binary), str(PROBE_SOURCE)],
                   check=True, capture_output=True)
    return binary


def with_probe(bundle: Path, probe: Path) -> Path:
    shutil.copy2(probe, bundle / "rootfs" / "vsock-probe")
    return bundle


def outcomes(stdout: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.decode().splitlines() if " " in line)


def assert_no_vsock(stdout: bytes) -> None:
    seen = outcomes(stdout)
    assert {way: seen.get(way) for way in WAYS} == {way: "EPERM" for way in WAYS}, stdout.decode()
    # Not a container without sockets: only vsock is refused.
    assert seen.get("unix-socket") == "allowed" and seen.get("inet-socket") == "allowed", stdout.decode()


def test_an_ordinary_container_gets_no_vsock_socket(vm_env, probe):
    bundle = with_probe(vm_env.bundle("ordinary", ["/vsock-probe"]), probe)
    result = vm_env.vmrun("run", "--bundle", str(bundle), "ordinary")
    assert result.returncode == 0, result.stderr
    assert_no_vsock(result.stdout)


def test_the_attacker_gets_no_vsock_socket_even_in_the_guests_namespaces(vm_env, probe):
    """Every capability and no seccomp profile of its own; a filter survives setns, so the
    guest's own python3, entered into PID 1's namespaces, is refused as well."""
    python = "import socket; socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); print('guest-python allowed')"
    script = f'/vsock-probe; {IN_GUEST_ROOT} python3 -c "{python}" 2>&1 | tail -n 1'
    bundle = with_probe(attacker_bundle(vm_env.base / "bundles" / "attacker", script), probe)
    result = vm_env.vmrun("run", "--bundle", str(bundle), "attacker")
    assert result.returncode == 0, result.stderr
    assert_no_vsock(result.stdout)
    assert result.stdout.decode().splitlines()[-1] == "PermissionError: [Errno 1] Operation not permitted"


def test_the_containers_own_profile_applies_as_well_and_cannot_allow_vsock(vm_env, probe):
    """The user's profile denies mkdir, and lets socket and io_uring_setup through with an
    unconditional rule of its own (LOG: allow, and log)."""
    script = "/vsock-probe; mkdir /dev/shm/made && echo mkdir allowed"
    bundle = with_probe(vm_env.bundle("profiled", ["sh", "-c", script]), probe)
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["socket", "io_uring_setup"], "action": "SCMP_ACT_LOG"},
        ],
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "profiled")
    assert b"mkdir allowed" not in result.stdout
    assert b"Operation not permitted" in result.stderr, result.stderr
    assert_no_vsock(result.stdout)


def test_a_process_execd_into_a_container_gets_no_vsock_socket(vm_env, probe):
    bundle = with_probe(vm_env.bundle("execd", ["sleep", "600"]), probe)
    assert vm_env.vmrun("create", "--bundle", str(bundle), "execd", detached=True).returncode == 0
    try:
        assert vm_env.vmrun("start", "execd").returncode == 0
        result = vm_env.vmrun("exec", "execd", "/vsock-probe")
        assert result.returncode == 0, result.stderr
        assert_no_vsock(result.stdout)
    finally:
        assert vm_env.vmrun("delete", "--force", "execd").returncode == 0
