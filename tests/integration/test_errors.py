"""Bad input: one line on stderr (and in the --log JSON), a non-zero exit, nothing left."""

from __future__ import annotations

import json
import time

import pytest
from leftovers import processes_mentioning

pytestmark = pytest.mark.integration


def assert_clean_failure(result, fragment, log=None):
    assert result.returncode != 0
    err = result.stderr.decode().strip()
    assert "\n" not in err and fragment in err, err
    if log is not None:
        last = json.loads(log.read_text().strip().splitlines()[-1])
        assert last["level"] == "error" and fragment in last["msg"]


def test_config_that_does_not_parse(vm_env):
    bundle = vm_env.bundle("badjson", ["true"])
    (bundle / "config.json").write_text("{ this is not json")
    log = vm_env.base / "log.json"
    result = vm_env.vmrun("--log", str(log), "--log-format", "json", "run", "--bundle", str(bundle), "bad")
    assert_clean_failure(result, "not valid JSON", log)


def test_missing_rootfs(vm_env):
    bundle = vm_env.bundle("norootfs", ["true"])
    import shutil

    shutil.rmtree(bundle / "rootfs")
    assert_clean_failure(vm_env.vmrun("run", "--bundle", str(bundle), "norootfs"), "does not exist")


@pytest.mark.parametrize("command", [["state", "nosuch"], ["kill", "nosuch"], ["delete", "nosuch"]])
def test_unknown_id(vm_env, command):
    assert_clean_failure(vm_env.vmrun(*command), "does not exist")


@pytest.mark.parametrize("bad_id", ["a/b", "..", "../escape", "x/../y"])
def test_ids_with_slash_or_dotdot(vm_env, bad_id):
    bundle = vm_env.bundle("ids", ["true"])
    assert_clean_failure(vm_env.vmrun("run", "--bundle", str(bundle), bad_id), "invalid container id")


def test_process_that_crun_cannot_start(vm_env):
    bundle = vm_env.bundle("nobinary", ["/no/such/binary"])
    result = vm_env.vmrun("run", "--bundle", str(bundle), "nobinary")
    assert result.returncode != 0
    assert "\n" not in result.stderr.decode().strip()


def test_qemu_that_cannot_start(vm_env):
    """QEMU exits at once (here: no memory for the guest); we say why, at once, not after
    waiting for its QMP connection."""
    with vm_env.config_path.open("a") as config:
        config.write("memory_mib = 900000000\n")
    bundle = vm_env.bundle("noqemu", ["true"])
    log = vm_env.base / "log.json"
    started = time.monotonic()
    result = vm_env.vmrun("--log", str(log), "--log-format", "json", "run", "--bundle", str(bundle), "noqemu")
    assert_clean_failure(result, "QEMU failed to start", log)
    assert "guest RAM" in result.stderr.decode()
    assert time.monotonic() - started < 5  # the QMP accept timeout is 10 s
    # The sandbox went, but its logs stay where the error says.
    [kept] = (vm_env.base / "run" / "failed").iterdir()
    assert f"(the sandbox's logs: {kept})" in result.stderr.decode()
    assert "guest RAM" in (kept / "qemu.log").read_text()


def test_create_that_crun_refuses_sends_its_early_shim_away(vm_env):
    """create starts the shim while the guest boots; when the container then cannot be
    made, the shim goes too: create ends (nobody holds its output) and leaves nothing."""
    bundle = vm_env.bundle("badmount", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append({"destination": "/mnt", "type": "nosuchfs", "source": "none"})
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("create", "--bundle", str(bundle), "badmount", timeout=120)
    assert result.returncode != 0
    assert "\n" not in result.stderr.decode().strip(), result.stderr
    assert vm_env.vmrun("state", "badmount").returncode != 0  # no container recorded
    deadline = time.monotonic() + 10
    while processes_mentioning("--container badmount") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning("--container badmount")
