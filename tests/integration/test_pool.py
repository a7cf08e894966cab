"""A pool of ready guests: create takes one, the pool refills, and without a pool create
boots a guest of its own."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from leftovers import wait_for

from vmrun.sandbox import vm_dir_for

pytestmark = pytest.mark.integration


def pool_idle(vm_env) -> int:
    result = vm_env.vmrun("pool", "status")
    return json.loads(result.stdout)["idle"] if result.returncode == 0 else -1


def wait_for_pool(vm_env, idle: int) -> None:
    wait_for(lambda: pool_idle(vm_env) == idle, timeout=120, interval=0.2, message=f"{idle} idle guest(s)")


def test_pool_hands_out_refills_and_falls_back(vm_env):
    vm_env.config_path.write_text(vm_env.config_path.read_text()
                                  + f'pool_socket = "{vm_env.base}/pool.sock"\npool_size = 1\n')
    config = vm_env.config()
    bundle = vm_env.bundle("pooled", ["sleep", "600"])
    pool = vm_env.popen("pool", "serve", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    try:
        wait_for_pool(vm_env, 1)
        assert vm_env.vmrun("create", "--bundle", str(bundle), "c1", detached=True).returncode == 0
        state = json.loads((vm_env.root / "c1" / "state.json").read_text())
        assert state["vm_dir"] != str(vm_dir_for(config, "c1")), "c1 should run in a pooled guest"
        assert "/vm/" in state["vm_dir"]
        assert vm_env.vmrun("start", "c1").returncode == 0
        ran = vm_env.vmrun("exec", "c1", "echo", "in-a-pooled-guest")
        assert ran.returncode == 0 and ran.stdout == b"in-a-pooled-guest\n"
        # The pool starts a replacement for the guest it handed out.
        wait_for_pool(vm_env, 1)
        assert len(list((vm_env.base / "run" / "vm").iterdir())) == 2
    finally:
        pool.send_signal(signal.SIGTERM)
        _, err = pool.communicate(timeout=60)
    assert pool.returncode == 0, err
    # The idle guest went with the pool; the adopted one still serves c1.
    assert len(list((vm_env.base / "run" / "vm").iterdir())) == 1
    assert vm_env.vmrun("exec", "c1", "true").returncode == 0
    assert vm_env.vmrun("delete", "--force", "c1").returncode == 0

    # No pool: create boots a guest of its own.
    assert vm_env.vmrun("create", "--bundle", str(bundle), "c2", detached=True).returncode == 0
    assert json.loads((vm_env.root / "c2" / "state.json").read_text())["vm_dir"] == str(vm_dir_for(config, "c2"))
    assert vm_env.vmrun("delete", "--force", "c2").returncode == 0
