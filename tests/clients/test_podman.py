"""podman + conmon drive vmrun: run --rm, exit codes, a terminal with resize, exec, stop, rm.

Storage, configuration and vmrun's state are private (tests/clients/podman_env.py says
how podman calls a runtime and why the setup is what it is). After every test nothing may
be left: no container, no process mentioning the private directory, no mount, no vmrun
state, no sandbox dir in vmrun's run_dir.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from engine_cases import check_exec_stop_rm
from podman_env import BOOT_TIMEOUT, IMAGE, RUN_FLAGS, conmon_term_sockets

pytestmark = [pytest.mark.integration, pytest.mark.clients]

HOST_KERNEL = os.uname().release



def test_run_rm_output_from_guest(podman):
    started = time.monotonic()
    result = podman("run", "--rm", *RUN_FLAGS, IMAGE, "sh", "-c", "echo kernel=$(uname -r); echo hello-from-podman")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, podman.explain(result)
    lines = result.stdout.split()
    assert "hello-from-podman" in lines, podman.explain(result)
    kernel = next(line.split("=", 1)[1] for line in lines if line.startswith("kernel="))
    assert kernel and kernel != HOST_KERNEL, f"the container ran on the host's kernel {HOST_KERNEL}"
    print(f"podman run --rm: {elapsed:.1f}s, guest kernel {kernel}")


def test_exit_code(podman):
    result = podman("run", "--rm", *RUN_FLAGS, IMAGE, "sh", "-c", "echo about-to-exit; exit 7")
    assert result.returncode == 7, podman.explain(result)
    assert "about-to-exit" in result.stdout, podman.explain(result)


def test_terminal_input_and_resize(podman):
    """run -it on a terminal: the size set before podman runs, typed input, then a resize."""
    script = ('echo size1=$(stty size) tty=$(tty); read line; echo got-$line; n=0; '
              'while [ "$(stty size)" = "33 101" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done; '
              'echo size2=$(stty size); exit 5')
    term = podman.terminal("run", "--rm", "-it", *RUN_FLAGS, IMAGE, "sh", "-c", script, rows=33, columns=101)
    try:
        first = term.expect(r"size1=(\d+ \d+) tty=(\S+)", BOOT_TIMEOUT)
        assert first.group(1) == b"33 101", f"initial size in the guest: {first.group(1)!r}\n{term.text()}"
        assert first.group(2).startswith(b"/dev/pts/"), term.text()
        term.send(b"typed-in\r")
        term.expect(r"got-typed-in", 60)
        term.resize(40, 120)
        second = term.expect(r"size2=(\d+ \d+)", 90)
        assert second.group(1) == b"40 120", f"size after the resize: {second.group(1)!r}\n{term.text()}"
        rc = term.wait(120)
    finally:
        term.close()
    assert rc == 5, f"exit status {rc}\n{term.text()}"


def test_exec_stop_rm(podman):
    check_exec_stop_rm(podman, IMAGE, RUN_FLAGS, ("--force", "--time", "0"))


def test_exec_tty(podman):
    name = f"vmrun-exec-t-{uuid.uuid4().hex[:8]}"
    result = podman("run", "-d", "--name", name, *RUN_FLAGS, IMAGE, "sleep", "600")
    assert result.returncode == 0, podman.explain(result)
    sockets_before = conmon_term_sockets()
    try:
        result = podman("exec", "-t", name, "sh", "-c", "tty; exit 6")
        assert result.returncode == 6 and result.stdout.strip().startswith("/dev/pts/"), podman.explain(result)
    finally:
        podman("rm", "--force", "--time", "0", name, timeout=120)
        assert conmon_term_sockets() - sockets_before == set()
