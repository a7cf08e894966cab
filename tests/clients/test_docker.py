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

from engine_cases import check_exec_stop_rm
from docker_env import IMAGE, RUN_FLAGS

pytestmark = [pytest.mark.integration, pytest.mark.clients]

HOST_KERNEL = os.uname().release



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
    check_exec_stop_rm(docker, IMAGE, RUN_FLAGS, ("--force",))


def test_exec_tty(docker):
    name = f"vmrun-exec-t-{uuid.uuid4().hex[:8]}"
    result = docker("run", "-d", "--name", name, *RUN_FLAGS, IMAGE, "sleep", "600")
    assert result.returncode == 0, docker.explain(result)
    try:
        result = docker("exec", "-t", name, "sh", "-c", "tty; exit 6")
        assert result.returncode == 6 and result.stdout.strip().startswith("/dev/pts/"), docker.explain(result)
    finally:
        docker("rm", "--force", name, timeout=120)
