"""Cases run alike through docker's and podman's command lines (they take the same verbs)."""

from __future__ import annotations

import os
import time
import uuid

from podman_env import vm_dirs_in_state

HOST_KERNEL = os.uname().release


def check_exec_stop_rm(cli, image: str, run_flags: tuple[str, ...], rm_force: tuple[str, ...]) -> None:
    """run -d, exec (status, pid namespace, stdin), stop -t 1 (SIGTERM reaches PID 1, then
    SIGKILL: 137), rm: the same through docker's and podman's command lines."""
    name = f"vmrun-exec-{uuid.uuid4().hex[:8]}"
    # PID 1 survives SIGTERM (it only says so), so `stop -t 1` has to fall back to SIGKILL.
    script = "trap 'echo got-TERM' TERM; echo ready; while :; do sleep 1 & wait $!; done"
    result = cli("run", "-d", "--name", name, *run_flags, image, "sh", "-c", script)
    assert result.returncode == 0, cli.explain(result)
    try:
        deadline = time.monotonic() + 60
        while "ready" not in (logs := cli("logs", name, timeout=60)).stdout and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "ready" in logs.stdout, cli.explain(logs)
        # vmrun ran with the test's private configuration.
        vm_dirs = vm_dirs_in_state(cli.state)
        assert len(vm_dirs) == 1 and all(d.startswith(f"{cli.run_dir}/") for d in vm_dirs.values()), vm_dirs

        result = cli("exec", name, "sh", "-c", "echo exec-kernel=$(uname -r); cat /proc/1/cmdline; echo; exit 3")
        assert result.returncode == 3, cli.explain(result)
        assert f"exec-kernel={HOST_KERNEL}" not in result.stdout and "exec-kernel=" in result.stdout, \
            cli.explain(result)
        assert "trap" in result.stdout, f"exec is not in the container's pid namespace\n{cli.explain(result)}"

        result = cli("exec", "-i", name, "sh", "-c", "read line; echo piped=$line", input="through-stdin\n")
        assert result.returncode == 0 and "piped=through-stdin" in result.stdout, cli.explain(result)

        started = time.monotonic()
        result = cli("stop", "-t", "1", name, timeout=120)
        stop_seconds = time.monotonic() - started
        assert result.returncode == 0, cli.explain(result)
        assert stop_seconds >= 1.0, f"stop took {stop_seconds:.2f}s: no grace period?"
        inspect = cli("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, timeout=60)
        assert inspect.stdout.split() == ["exited", "137"], cli.explain(inspect)
        logs = cli("logs", name, timeout=60)
        assert "got-TERM" in logs.stdout, f"SIGTERM did not reach PID 1 in the guest\n{cli.explain(logs)}"

        result = cli("rm", name, timeout=120)
        assert result.returncode == 0, cli.explain(result)
        assert name not in cli("ps", "-a", "--format", "{{.Names}}", timeout=60).stdout
    finally:
        if name in cli("ps", "-a", "--format", "{{.Names}}", timeout=60).stdout:
            cli("rm", *rm_force, name, timeout=120)


def ping_from(cli, name: str, target: str) -> None:
    """`ping target` from container `name` (docker or podman) succeeds; a few tries, as a
    guest's NIC may still be on its way up."""
    deadline = time.monotonic() + 60
    while True:
        result = cli("exec", name, "ping", "-c", "1", "-W", "3", target, timeout=60)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0 and "1 packets received" in result.stdout, cli.explain(result)
