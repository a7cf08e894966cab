"""OCI hooks with real guests: each kind runs where and when the runtime-spec says, reads
the container's state on stdin, and a failing create-time hook leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from leftovers import wait_for

pytestmark = pytest.mark.integration

HOST_KINDS = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")


def _with_hooks(bundle, hooks: dict) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    spec["hooks"] = hooks
    (bundle / "config.json").write_text(json.dumps(spec))


def _recording_hook(marks, kind: str) -> dict:
    # Keeps the state it read, and says in which order the hooks ran.
    script = f"cat > {marks}/{kind}.json && echo {kind} >> {marks}/order"
    return {"path": "/bin/sh", "args": ["sh", "-c", script], "timeout": 30}


def test_every_hook_kind_runs_in_order_with_the_state(vm_env):
    marks = vm_env.base / "marks"
    marks.mkdir()
    bundle = vm_env.bundle("hooked", ["cat", "/dev/shm/from-start-hook"])
    hooks = {kind: [_recording_hook(marks, kind)] for kind in HOST_KINDS}
    # startContainer runs inside the container (its path is the container's), before its process.
    hooks["startContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", "echo in-container > /dev/shm/from-start-hook"]}]
    _with_hooks(bundle, hooks)
    out, err = vm_env.base / "out", vm_env.base / "err"
    pid_file = vm_env.base / "pid"
    # Files, not pipes: the shim keeps the container's stdio.
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        created = subprocess.run([*vm_env.cli(), "create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                                  "hooked"], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                 env=vm_env.env, timeout=180)
    assert created.returncode == 0, err.read_text()
    pid = int(pid_file.read_text())
    assert (marks / "order").read_text().split() == ["prestart", "createRuntime", "createContainer"]
    for kind in ("prestart", "createRuntime", "createContainer"):
        state = json.loads((marks / f"{kind}.json").read_text())
        assert state == {"ociVersion": state["ociVersion"], "id": "hooked", "status": "creating", "pid": pid,
                         "bundle": str(bundle), "annotations": {}}, kind
    # As with runc, the pid the hooks get lives in the container's own network namespace.
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    assert vm_env.vmrun("start", "hooked").returncode == 0
    assert json.loads((marks / "poststart.json").read_text())["status"] == "running"
    wait_for(lambda: vm_env.vmrun("state", "hooked").stdout and
             json.loads(vm_env.vmrun("state", "hooked").stdout)["status"] == "stopped")
    assert out.read_bytes() == b"in-container\n", err.read_text()
    assert vm_env.vmrun("delete", "hooked").returncode == 0
    assert (marks / "order").read_text().split() == list(HOST_KINDS)
    poststop = json.loads((marks / "poststop.json").read_text())
    assert poststop["status"] == "stopped" and poststop["id"] == "hooked" and "pid" not in poststop
    assert not list((vm_env.base / "run" / "netns").iterdir())


@pytest.mark.parametrize("failing", ["prestart", "createRuntime", "createContainer"])
def test_a_failing_create_hook_fails_create_and_leaves_nothing(vm_env, failing):
    marks = vm_env.base / "marks"
    marks.mkdir()
    bundle = vm_env.bundle("failing", ["echo", "must not run"])
    hooks = {kind: [_recording_hook(marks, kind)] for kind in HOST_KINDS}
    hooks[failing] = [{"path": "/bin/sh", "args": ["sh", "-c", "echo no network for you >&2; exit 7"]}]
    _with_hooks(bundle, hooks)
    created = vm_env.vmrun("create", "--bundle", str(bundle), "failing")
    assert created.returncode != 0
    assert f"{failing} hook #0 (/bin/sh) failed with exit status 7: no network for you" in created.stderr.decode()
    assert len(created.stderr.decode().strip().splitlines()) == 1, created.stderr
    assert vm_env.vmrun("state", "failing").returncode != 0
    ran = (marks / "order").read_text().split() if (marks / "order").exists() else []
    assert "poststart" not in ran and "poststop" not in ran
    assert not list((vm_env.base / "run" / "netns").iterdir())
    # The fixture checks the rest: no process, mount, guest directory or state left.


def test_vmrun_run_runs_the_hooks_too(vm_env):
    marks = vm_env.base / "marks"
    marks.mkdir()
    bundle = vm_env.bundle("ran", ["echo", "ran"])
    _with_hooks(bundle, {kind: [_recording_hook(marks, kind)] for kind in HOST_KINDS})
    result = vm_env.vmrun("run", "--bundle", str(bundle), "ran")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr
    assert (marks / "order").read_text().split() == list(HOST_KINDS)
    assert json.loads((marks / "prestart.json").read_text())["status"] == "creating"
    assert json.loads((marks / "poststop.json").read_text())["status"] == "stopped"


def test_a_failing_prestart_hook_stops_vmrun_run(vm_env):
    bundle = vm_env.bundle("ranfail", ["echo", "must not run"])
    _with_hooks(bundle, {"prestart": [{"path": "/bin/false"}]})
    result = vm_env.vmrun("run", "--bundle", str(bundle), "ranfail")
    assert result.returncode != 0 and result.stdout == b""
    assert b"prestart hook #0 (/bin/false) failed with exit status 1" in result.stderr
