"""A pid in vmrun's state outlives the host process it named (issue 14, item 10).

Once a shim or a sandbox daemon is dead, the kernel may give its pid to any process: kill
and delete must then neither trust nor signal that pid. The kernel cannot be made to reuse
a pid on demand, so each test kills our process and rewrites state.json to name an
unrelated one in its place, as a reused pid would, then checks the stranger is unharmed
and the delete still cleans up (the fixture checks processes, mounts, sandbox dirs, state).
Also: the state is root's alone (issue 14, item 6).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from leftovers import wait_for


def state_doc(vm_env, container_id: str) -> dict:
    result = vm_env.vmrun("state", container_id)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def state_file(vm_env, container_id: str) -> Path:
    return vm_env.root / container_id / "state.json"


def create_and_start(vm_env, container_id: str) -> None:
    bundle = vm_env.bundle(container_id, ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), container_id, detached=True).returncode == 0
    assert vm_env.vmrun("start", container_id).returncode == 0
    assert state_doc(vm_env, container_id)["status"] == "running"


def gone(pid: int) -> bool:
    """No process holds `pid`, or a zombie nobody reaped yet (this sandbox's pid 1 may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_dead(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), timeout=10, message=f"pid {pid} gone")


@contextmanager
def strangers(count: int) -> Iterator[list[subprocess.Popen]]:
    """Unrelated processes, to stand where vmrun's dead ones were; none outlives the test."""
    started = [subprocess.Popen(["sleep", "120"]) for _ in range(count)]
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


def unharmed(process: subprocess.Popen) -> bool:
    """Still running a moment later: a signal sent to it would have ended it by then."""
    try:
        process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        return True
    return False


def take_over_pids(vm_env, container_id: str, **pids: int) -> None:
    """Rewrite the state as if these fields' pids now belonged to other processes (any
    start time recorded stays: the one of the process that died)."""
    path = state_file(vm_env, container_id)
    document = json.loads(path.read_text())
    document.update(pids)
    path.write_text(json.dumps(document))


def test_kill_and_delete_spare_the_process_that_took_the_shims_pid(vm_env):
    create_and_start(vm_env, "reused")
    doc = state_doc(vm_env, "reused")
    assert set(doc) == {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"}  # runc's
    shim = doc["pid"]
    kill_dead(shim)  # the agent then kills the container's process in the guest
    wait_for(lambda: state_doc(vm_env, "reused")["status"] == "stopped", message="container stopped")
    with strangers(1) as (stranger,):
        take_over_pids(vm_env, "reused", pid=stranger.pid)
        seen = state_doc(vm_env, "reused")
        vm_env.vmrun("kill", "reused", "KILL")  # refused or not, it must not reach the stranger
        assert unharmed(stranger), "kill signalled the stranger"
        deleted = vm_env.vmrun("delete", "--force", "reused")
        assert unharmed(stranger), "delete --force signalled the stranger"
        assert deleted.returncode == 0, deleted.stderr
    # The pid was not the container's: it read as stopped (pid 0, as runc).
    assert seen["status"] == "stopped" and seen["pid"] == 0, seen
    assert vm_env.vmrun("state", "reused").returncode != 0


def test_delete_spares_the_processes_that_took_the_shims_and_daemons_pids(vm_env):
    create_and_start(vm_env, "orphan")
    recorded = json.loads(state_file(vm_env, "orphan").read_text())
    kill_dead(recorded["pid"])
    kill_dead(recorded["daemon_pid"])  # its QEMU and helpers die with it; its mounts and files stay
    with strangers(2) as (shim_heir, daemon_heir):
        take_over_pids(vm_env, "orphan", pid=shim_heir.pid, daemon_pid=daemon_heir.pid)
        seen = state_doc(vm_env, "orphan")
        deleted = vm_env.vmrun("delete", "--force", "orphan")
        assert unharmed(shim_heir), "delete --force signalled the process holding the shim's old pid"
        assert unharmed(daemon_heir), "delete --force signalled the process holding the daemon's old pid"
        assert deleted.returncode == 0, deleted.stderr
    assert seen["status"] == "stopped", seen
    assert vm_env.vmrun("state", "orphan").returncode != 0


def test_state_is_for_root_only(vm_env):
    bundle = vm_env.bundle("private", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "private", detached=True).returncode == 0
    try:
        assert stat.S_IMODE(vm_env.root.stat().st_mode) == 0o700  # made by vmrun
        assert stat.S_IMODE((vm_env.root / "private").stat().st_mode) == 0o700
        assert stat.S_IMODE(state_file(vm_env, "private").stat().st_mode) == 0o600
        assert [p.name for p in (vm_env.root / "private").iterdir()] == ["state.json"]
    finally:
        assert vm_env.vmrun("delete", "--force", "private").returncode == 0
