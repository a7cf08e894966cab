"""The guest's OOM killer, as runc reports it: `vmrun events` prints {"type": "oom"}."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from leftovers import wait_for

pytestmark = pytest.mark.integration


def test_an_oom_kill_is_an_oom_event(vm_env):
    bundle = vm_env.bundle("hog", ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"].setdefault("resources", {})["memory"] = {"limit": 64 << 20}
    (bundle / "config.json").write_text(json.dumps(spec))
    assert vm_env.vmrun("create", "--bundle", str(bundle), "hog", detached=True).returncode == 0
    events = None
    try:
        assert vm_env.vmrun("start", "hog").returncode == 0
        events = vm_env.popen("events", "--interval", "60s", "hog", stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines: list[dict] = []
        reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in events.stdout),
                                  daemon=True)
        reader.start()
        wait_for(lambda: any(e["type"] == "stats" for e in lines), 60, message="the first stats event")
        hog = vm_env.vmrun("exec", "hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1")
        assert hog.returncode == 137, hog.stderr
        wait_for(lambda: {"type": "oom", "id": "hog"} in lines, 30, message="the oom event")
    finally:
        if events is not None:
            events.terminate()
            events.wait(10)
            events.stdout.close()
        assert vm_env.vmrun("delete", "--force", "hog", timeout=60).returncode == 0
