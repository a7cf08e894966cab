"""The sandbox's guest under QMP, and its teardown."""

from __future__ import annotations

import os

import pytest

from vmrun.errors import HypervisorError
from vmrun.sandbox import Sandbox

pytestmark = pytest.mark.integration


def test_qmp_lifecycle_and_teardown(vm_env):
    sandbox = Sandbox("qmp-test", vm_env.config()).start()
    try:
        vm = sandbox.vm
        assert vm.status() == "running"
        vm.pause()
        assert vm.status() == "paused"
        vm.resume()
        assert vm.status() == "running"
        assert sandbox.agent.health()
        details = sandbox.agent.guest_details()
        assert details.memory_bytes > 0 and details.kernel_release == sandbox.kernel_release
        qemu_pid = vm.pid
        vm_dir = sandbox.dir
    finally:
        sandbox.close()
    assert not os.path.exists(f"/proc/{qemu_pid}") or open(f"/proc/{qemu_pid}/stat").read().split()[2] == "Z"
    assert not vm_dir.exists()


def test_a_guest_that_never_gets_ready_is_reported_and_cleaned_up(vm_env, tmp_path):
    # A kernel command line that makes init fail: the guest powers off, QEMU exits.
    config_path = vm_env.config_path
    config_path.write_text(config_path.read_text() + 'kernel_params = "init=/nonexistent rdinit=/nonexistent"\n')
    with pytest.raises(HypervisorError) as err:
        Sandbox("never-ready", vm_env.config()).start()
    assert "QEMU exited" in str(err.value) or "not ready" in str(err.value)


def test_debug_reaches_every_process_of_the_sandbox_and_its_log_goes_with_the_pod(vm_env):
    bundle = vm_env.bundle("debugged", ["sleep", "600"])
    assert vm_env.vmrun("--debug", "create", "--bundle", str(bundle), "debugged", detached=True).returncode == 0
    try:
        [log] = (vm_env.base / "run" / "daemon-logs").iterdir()
        assert "level=debug" in log.read_text()
        [vm_dir] = (vm_env.base / "run" / "vm").iterdir()
        # The agent in the guest, on the console: the container's creation, and crun's.
        console = (vm_dir / "console.log").read_text(errors="replace")
        assert "vmrun-agent: debug:" in console and "CreateContainer(debugged): ok" in console
        assert "crun run --detach" in console or "crun create" in console
        assert "DEBUG" in (vm_dir / "vsock-backend.log").read_text(errors="replace")
        virtiofsd_log = (vm_dir / "virtiofsd.log").read_text(errors="replace")
        assert "Got VU event" in virtiofsd_log or "DEBUG" in virtiofsd_log  # QEMU's C one, or the Rust one
    finally:
        assert vm_env.vmrun("delete", "--force", "debugged").returncode == 0
    assert not list((vm_env.base / "run" / "daemon-logs").iterdir())
