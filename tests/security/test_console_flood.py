"""The guest's console is the guest's to write: on the host it is kept at a bounded size."""

from __future__ import annotations

from attacker import attacker_bundle

CONSOLE_LIMIT = 1 << 20  # bytes per file, as README's security model says


def test_a_guest_flooding_its_console_fills_no_more_than_two_files(vm_env):
    bundle = attacker_bundle(vm_env.base / "bundles" / "flood", "exec sleep 600")
    assert vm_env.vmrun("create", "--bundle", str(bundle), "flood", detached=True).returncode == 0
    # Straight to the guest's serial port: 3 MiB, three times the cap.
    flooded = vm_env.vmrun("exec", "flood", "sh", "-c", """
        mknod /dev/ttyS0 c 4 64 && head -c 3145728 /dev/zero | tr '\\0' x > /dev/ttyS0 && echo FLOODED""",
                           timeout=600)
    assert b"FLOODED" in flooded.stdout, flooded
    [vm_dir] = (vm_env.base / "run" / "vm").iterdir()
    logs = {p.name: p.stat().st_size for p in vm_dir.glob("console.log*")}
    assert set(logs) == {"console.log", "console.log.1"}, logs
    assert all(size <= CONSOLE_LIMIT for size in logs.values()), logs
    assert sum(logs.values()) >= CONSOLE_LIMIT  # the newest output is kept
    assert vm_env.vmrun("delete", "--force", "flood").returncode == 0
