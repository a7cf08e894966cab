"""kill -9 of each process vmrun starts for a running container: within seconds the
container reads stopped (its shim exits), a foreground `vmrun run` returns, and `delete`
leaves nothing behind (the fixture checks processes, mounts, guest directories, state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from leftovers import mounts_under, scan_processes, wait_for

# How each victim shows in its command line.
_HELPERS = {"qemu": "qemu-system", "virtiofsd": "virtiofsd", "vsock-backend": "vsock.vhost_user",
            "daemon": "sandbox_daemon"}
_DEADLINE = 5.0


def _helper_pid(vm_env, marker: str) -> int:
    """The test's one process whose command line has `marker` (the daemon names no path,
    but carries the test's VMRUN_CONFIG); virtiofsd by its program (QEMU's command line
    names virtiofsd's socket)."""
    found = [pid for pid, cmdline in scan_processes(str(vm_env.base))
             if (cmdline.split(" ", 1)[0].endswith("/virtiofsd") if marker == "virtiofsd" else marker in cmdline)]
    assert len(found) == 1, (marker, found)
    return found[0]


def _status(vm_env, container_id: str) -> str:
    return json.loads(vm_env.vmrun("state", container_id).stdout)["status"]


@pytest.mark.parametrize("victim", [*_HELPERS, "shim"])
def test_a_killed_helper_stops_the_container(vm_env, victim):
    bundle = vm_env.bundle("victim", ["sleep", "600"])
    pid_file = vm_env.base / "pid"
    assert vm_env.vmrun("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "victim",
                        detached=True).returncode == 0
    assert vm_env.vmrun("start", "victim").returncode == 0
    pid = int(pid_file.read_text()) if victim == "shim" else _helper_pid(vm_env, _HELPERS[victim])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while _status(vm_env, "victim") != "stopped":
        assert time.monotonic() - killed < _DEADLINE, f"still {_status(vm_env, 'victim')} after killing {victim}"
        time.sleep(0.1)
    # A signal to it is an answer now, not a wait for a deadline.
    assert vm_env.vmrun("kill", "--all", "victim", "KILL", timeout=10).returncode == 0
    deleted = vm_env.vmrun("delete", "victim", timeout=60)
    assert deleted.returncode == 0, deleted.stderr


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd", "vsock-backend"])
def test_a_killed_helper_ends_vmrun_run(vm_env, victim):
    bundle = vm_env.bundle("runvictim", ["sh", "-c", "echo up; exec sleep 600"])
    run = vm_env.popen("run", "--bundle", str(bundle), "runvictim", stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout.readline() == b"up\n"
        os.kill(_helper_pid(vm_env, _HELPERS[victim]), signal.SIGKILL)
        killed = time.monotonic()
        code = run.wait(30)
        assert time.monotonic() - killed < _DEADLINE, f"vmrun run returned {time.monotonic() - killed:.1f} s after"
        assert code != 0
        assert b"Traceback" not in run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stdout.close()
        run.stderr.close()


def test_the_next_call_reclaims_a_dead_daemons_guest(vm_env):
    """The daemon killed, `vmrun list` finds its pod and removes the guest's directory and
    the mounts in it, keeping the logs; the entry stays until delete."""
    bundle = vm_env.bundle("orphan", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "orphan", detached=True).returncode == 0
    vm_dir = vm_env.base / "run" / "vm"
    assert mounts_under(vm_dir), "the container's files are mounted into the share"
    os.kill(_helper_pid(vm_env, _HELPERS["daemon"]), signal.SIGKILL)
    wait_for(lambda: not list(scan_processes(str(vm_env.base))), timeout=_DEADLINE,
             message="the guest's helpers and the shim gone")
    listed = vm_env.vmrun("list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [(c["id"], c["status"]) for c in json.loads(listed.stdout)] == [("orphan", "stopped")]
    assert b"reclaimed" in listed.stderr
    assert not mounts_under(vm_dir)
    assert not any(vm_dir.iterdir()), "the guest's directory is gone"
    kept = list((vm_env.base / "run" / "failed").iterdir())
    assert len(kept) == 1 and (kept[0] / "console.log").is_file()
    deleted = vm_env.vmrun("delete", "orphan", timeout=60)
    assert deleted.returncode == 0, deleted.stderr

