"""A broken vmrun.toml never strands a container: state, kill, delete and list read only
--root, so a typo made while a container runs still lets its caller see it, stop it and
clean it up; every other command refuses, naming the file and the key."""

from __future__ import annotations

import json

import pytest
from leftovers import wait_for

pytestmark = pytest.mark.integration


def status(vm_env, container_id):
    result = vm_env.vmrun("state", container_id)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_state_kill_delete_list_survive_a_broken_config(vm_env):
    bundle = vm_env.bundle("broken", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "broken", detached=True).returncode == 0
    assert vm_env.vmrun("start", "broken").returncode == 0
    assert status(vm_env, "broken")["status"] == "running"

    with vm_env.config_path.open("a") as config:
        config.write("memory_mb = 1024\n")  # a typo for memory_mib

    refused = vm_env.vmrun("exec", "broken", "true")
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == (f"vmrun: {vm_env.config_path}: unknown setting 'memory_mb' "
                                               "(did you mean 'memory_mib'?)")

    # state's and list's output is what callers parse: nothing else on stdout or stderr.
    state = vm_env.vmrun("state", "broken")
    assert state.returncode == 0 and state.stderr == b"" and json.loads(state.stdout)["status"] == "running"
    listing = vm_env.vmrun("list", "--format", "json")
    assert listing.returncode == 0 and [s["id"] for s in json.loads(listing.stdout)] == ["broken"]

    kill = vm_env.vmrun("kill", "broken", "KILL")
    assert kill.returncode == 0, kill.stderr
    wait_for(lambda: status(vm_env, "broken")["status"] == "stopped")
    delete = vm_env.vmrun("delete", "--force", "broken")
    assert delete.returncode == 0, delete.stderr
    assert vm_env.vmrun("state", "broken").returncode == 1
    assert json.loads(vm_env.vmrun("list", "--format", "json").stdout) == []
    # vm_env checks that no process, mount, sandbox dir or state is left behind.


def test_delete_force_of_a_running_container_with_a_broken_config(vm_env):
    bundle = vm_env.bundle("forced", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "forced", detached=True).returncode == 0
    assert vm_env.vmrun("start", "forced").returncode == 0
    vm_env.config_path.write_text(vm_env.config_path.read_text() + "vcpus = = 2\n")  # not even TOML
    assert vm_env.vmrun("start", "forced").returncode == 1
    delete = vm_env.vmrun("delete", "--force", "forced")
    assert delete.returncode == 0, delete.stderr
    assert vm_env.vmrun("list", "-q").stdout == b""
