"""dockerd drives vmrun: `docker run --runtime vmrun` with output and an exit code, exec, stop, rm.

dockerd (Debian's docker.io, unpacked into a cache, not installed) and a private containerd
run in a network namespace of their own, with every path under one private directory
(tests/clients/docker_env.py). After every test nothing may be left: no container, no
process mentioning that directory but the two daemons, no mount but dockerd's data root,
no vmrun state, no sandbox dir; after the module, the daemons stop and the network
namespace goes, with nothing left at all.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from docker_env import IMAGE, RUN_FLAGS, DockerEnv, DockerSetupError
from podman_env import VMRUN_BINARY, vm_dirs_in_state

pytestmark = [pytest.mark.integration, pytest.mark.clients]

HOST_KERNEL = os.uname().release

# vmrun bug (reproduced with the vmrun CLI alone: `vmrun exec -t <64-char id> tty`):
# the guest agent binds an exec's console socket at
# /run/vmrun/bundles/<container id>/exec-<exec id>.sock, where vmrun's exec ids are
# "exec-" + 16 hex digits; with a 64-character container id (every docker, podman and
# Kubernetes container) that is 115 bytes, over AF_UNIX's 107.
@pytest.fixture(scope="module")
def docker_session():
    from guest.build import find_image
    from vmrun.config import Config

    if find_image(Config().image_dir) is None:
        pytest.fail("no guest image: run `vmrun image build` (scripts/setup.sh does)")
    if not VMRUN_BINARY.exists():
        pytest.fail(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh does)")
    try:
        env = DockerEnv()
    except DockerSetupError as exc:  # no archive to download docker.io from, and no cached copy
        pytest.skip(f"dockerd unavailable: {exc}")
    try:
        env.start()
        env.load_image()
    except BaseException:
        problems = env.close()
        if problems:
            print("\n".join(problems))
        raise
    yield env
    problems = env.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
def docker(docker_session):
    yield docker_session
    problems = docker_session.leftovers()
    assert not problems, "left behind:\n" + "\n".join(problems)


def test_run_rm_output_and_exit_code(docker):
    started = time.monotonic()
    script = "echo kernel=$(uname -r); echo hello-from-docker; exit 4"
    result = docker("run", "--rm", *RUN_FLAGS, IMAGE, "sh", "-c", script)
    elapsed = time.monotonic() - started
    assert result.returncode == 4, docker.explain(result)
    lines = result.stdout.split()
    assert "hello-from-docker" in lines, docker.explain(result)
    kernel = next((line.split("=", 1)[1] for line in lines if line.startswith("kernel=")), "")
    assert kernel and kernel != HOST_KERNEL, f"the container ran on the host's kernel {HOST_KERNEL}"
    print(f"docker run --rm: {elapsed:.1f}s, guest kernel {kernel}")


def test_exec_stop_rm(docker):
    name = f"vmrun-exec-{uuid.uuid4().hex[:8]}"
    # PID 1 survives SIGTERM (it only says so), so `stop -t 1` has to fall back to SIGKILL.
    script = "trap 'echo got-TERM' TERM; echo ready; while :; do sleep 1 & wait $!; done"
    result = docker("run", "-d", "--name", name, *RUN_FLAGS, IMAGE, "sh", "-c", script)
    assert result.returncode == 0, docker.explain(result)
    try:
        deadline = time.monotonic() + 60
        while "ready" not in (logs := docker("logs", name, timeout=60)).stdout and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "ready" in logs.stdout, docker.explain(logs)
        # The shim ran vmrun with containerd's environment: the private configuration.
        vm_dirs = vm_dirs_in_state(docker.state)
        assert len(vm_dirs) == 1 and all(d.startswith(f"{docker.run_dir}/") for d in vm_dirs.values()), vm_dirs

        result = docker("exec", name, "sh", "-c", "echo exec-kernel=$(uname -r); cat /proc/1/cmdline; echo; exit 3")
        assert result.returncode == 3, docker.explain(result)
        assert "exec-kernel=" in result.stdout and f"exec-kernel={HOST_KERNEL}" not in result.stdout, \
            docker.explain(result)
        assert "trap" in result.stdout, f"exec is not in the container's pid namespace\n{docker.explain(result)}"

        result = docker("exec", "-i", name, "sh", "-c", "read line; echo piped=$line", input="through-stdin\n")
        assert result.returncode == 0 and "piped=through-stdin" in result.stdout, docker.explain(result)

        started = time.monotonic()
        result = docker("stop", "-t", "1", name, timeout=120)
        stop_seconds = time.monotonic() - started
        assert result.returncode == 0, docker.explain(result)
        assert stop_seconds >= 1.0, f"stop took {stop_seconds:.2f}s: no grace period?"
        inspect = docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, timeout=60)
        assert inspect.stdout.split() == ["exited", "137"], docker.explain(inspect)
        logs = docker("logs", name, timeout=60)
        assert "got-TERM" in logs.stdout, f"SIGTERM did not reach PID 1 in the guest\n{docker.explain(logs)}"
        print(f"docker stop -t 1: {stop_seconds:.1f}s")

        result = docker("rm", name, timeout=120)
        assert result.returncode == 0, docker.explain(result)
    finally:
        if name in docker("ps", "-a", "--format", "{{.Names}}", timeout=60).stdout:
            docker("rm", "--force", name, timeout=120)


def test_exec_tty(docker):
    name = f"vmrun-exec-t-{uuid.uuid4().hex[:8]}"
    result = docker("run", "-d", "--name", name, *RUN_FLAGS, IMAGE, "sleep", "600")
    assert result.returncode == 0, docker.explain(result)
    try:
        result = docker("exec", "-t", name, "sh", "-c", "tty; exit 6")
        assert result.returncode == 6 and result.stdout.strip().startswith("/dev/pts/"), docker.explain(result)
    finally:
        docker("rm", "--force", name, timeout=120)
