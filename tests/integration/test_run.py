"""`vmrun run` end to end: a real guest, a real agent, crun inside."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

pytestmark = pytest.mark.integration


def test_output_comes_from_the_guest_kernel(vm_env, guest_image):
    bundle = vm_env.bundle("uname", ["uname", "-r"])
    result = vm_env.vmrun("run", "--bundle", str(bundle), "uname")
    assert result.returncode == 0, result.stderr
    release = result.stdout.decode().strip()
    assert release == guest_image.manifest["kernel"]["release"]
    assert release != os.uname().release


def test_a_spec_with_the_hosts_apparmor_profile_runs(vm_env):
    """docker and containerd set an AppArmor profile on AppArmor hosts: a host policy, which
    the guest has not loaded, so it is not asked of crun there."""
    bundle = vm_env.bundle("apparmor", ["echo", "confined by the VM"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["apparmorProfile"] = "docker-default"
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "apparmor")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"confined by the VM\n"


# Death by SIGKILL is tested from outside (test_kill_from_another_process): the container's
# init is PID 1 of its pid namespace, which ignores a SIGKILL sent from inside, as with runc.
@pytest.mark.parametrize("script, expected", [("exit 0", 0), ("exit 7", 7)])
def test_exit_status_propagates(vm_env, script, expected):
    bundle = vm_env.bundle("exit", ["sh", "-c", script])
    result = vm_env.vmrun("run", "--bundle", str(bundle), "exit")
    assert result.returncode == expected, result.stderr


def test_ten_megabytes_of_stdout_arrive_byte_exact(vm_env):
    bundle = vm_env.bundle("big", ["cat", "/data.bin"])
    data = os.urandom(10 << 20)
    (bundle / "rootfs" / "data.bin").write_bytes(data)
    result = vm_env.vmrun("run", "--bundle", str(bundle), "big")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_stdin_and_stderr(vm_env):
    bundle = vm_env.bundle("stdin", ["sh", "-c", "sha256sum; echo to-stderr >&2"])
    data = os.urandom(3 << 20)
    result = vm_env.vmrun("run", "--bundle", str(bundle), "stdin", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()
    assert result.stderr.decode().strip().endswith("to-stderr")


@contextmanager
def running(vm_env, name, script):
    """`vmrun run` in the background, once its container printed `started`."""
    bundle = vm_env.bundle(name, ["sh", "-c", script])
    process = vm_env.popen("run", "--bundle", str(bundle), name, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"started\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def test_signal_to_vmrun_reaches_the_container(vm_env):
    # The container's init is PID 1 of its namespace: only signals it handles reach it.
    script = "trap 'echo got-TERM; exit 42' TERM; echo started; while :; do sleep 0.1; done"
    with running(vm_env, "sleeper", script) as process:
        state = vm_env.vmrun("state", "sleeper")
        assert state.returncode == 0 and json.loads(state.stdout)["status"] == "running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 42
        assert process.stdout.read() == b"got-TERM\n"


def test_kill_from_another_process(vm_env):
    with running(vm_env, "victim", "echo started; exec sleep 600") as process:
        assert vm_env.vmrun("kill", "victim", "KILL").returncode == 0
        assert process.wait(60) == 128 + signal.SIGKILL


def test_stop_signal_during_boot_unwinds_everything(vm_env):
    bundle = vm_env.bundle("early", ["true"])
    process = vm_env.popen("run", "--bundle", str(bundle), "early", stderr=subprocess.PIPE)
    time.sleep(1.5)  # QEMU is up, the guest still booting
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert b"interrupted by SIGTERM" in err
    # The vm_env fixture checks that no process, mount, sandbox dir or state is left.


def test_delete_reclaims_what_a_killed_vmrun_left(vm_env):
    with running(vm_env, "crashed", "echo started; exec sleep 600") as process:
        process.kill()  # SIGKILL: no cleanup of its own; its helpers die with it
        process.wait()
        assert json.loads(vm_env.vmrun("state", "crashed").stdout)["status"] == "stopped"
        mounts_before = open("/proc/self/mounts").read().count(str(vm_env.base))
        assert mounts_before >= 1  # the rootfs bind it could not undo
        result = vm_env.vmrun("delete", "crashed")
        assert result.returncode == 0, result.stderr
        # The user's rootfs is intact, and the fixture checks nothing else is left.
        assert (vm_env.base / "bundles" / "crashed" / "rootfs" / "bin" / "busybox").exists()
