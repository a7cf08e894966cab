"""Standard streams as runc gives them: a reader that goes away reaches the container, and
a caller's closed stdin, stdout or stderr is read as EOF or written to nowhere, never a
traceback; the container's exit status still comes back."""

from __future__ import annotations

import json
import shlex
import subprocess
import time

import pytest

pytestmark = pytest.mark.integration


def _shell(vm_env, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, env=vm_env.env, timeout=timeout)


def _vmrun_line(vm_env, *args: str) -> str:
    return " ".join(shlex.quote(a) for a in (*vm_env.cli(), *args))


def test_a_closed_pipe_stops_the_container(vm_env):
    bundle = vm_env.bundle("yes", ["yes"])
    started = time.monotonic()
    # Without the reader's end reaching the container, `yes` would run (and we relay) forever.
    result = _shell(vm_env, f"{_vmrun_line(vm_env, 'run', '--bundle', str(bundle), 'yes')} | head -1; "
                            "echo status=${PIPESTATUS[0]}", timeout=120)
    assert result.stdout.decode().splitlines()[0] == "y", result.stderr
    # `yes` is its container's pid 1, which the kernel never kills with a signal it does not
    # handle (as under runc): it sees EPIPE and exits 1.
    assert "status=1" in result.stdout.decode(), result.stderr
    assert b"Broken pipe" in result.stderr and b"Traceback" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-"])
def test_run_with_a_closed_std_stream_keeps_the_status(vm_env, closed):
    bundle = vm_env.bundle("closed", ["sh", "-c", "read line; echo got=$line; echo err >&2; exit 3"])
    run = _vmrun_line(vm_env, "run", "--bundle", str(bundle), "closed")
    result = _shell(vm_env, f"{run} {closed}; echo status=$?")
    out, err = result.stdout.decode(), result.stderr.decode()
    assert "status=3" in out, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    if closed == "<&-":
        assert "got=" in out  # stdin read as EOF
    if closed == ">&-":
        assert "got=" not in out  # written to nowhere
    if closed == "2>&-":
        assert "err" not in err


def test_create_start_and_exec_with_closed_streams(vm_env):
    bundle = vm_env.bundle("closedlife", ["sleep", "600"])
    try:
        created = _shell(vm_env, f"{_vmrun_line(vm_env, 'create', '--bundle', str(bundle), 'closedlife')} "
                                 "<&- >&- 2>&-; echo status=$?")
        assert "status=0" in created.stdout.decode(), created
        assert json.loads(vm_env.vmrun("state", "closedlife").stdout)["status"] == "created"
        assert vm_env.vmrun("start", "closedlife").returncode == 0
        for closed in ("<&-", ">&-", "2>&-"):
            execd = _shell(vm_env, f"{_vmrun_line(vm_env, 'exec', 'closedlife', 'sh', '-c', 'echo hi; exit 5')} "
                                   f"{closed}; echo status=$?")
            assert "status=5" in execd.stdout.decode(), (closed, execd)
            assert b"Traceback" not in execd.stderr
    finally:
        assert vm_env.vmrun("delete", "--force", "closedlife").returncode == 0
