"""A guest kernel that fails for good (a BUG, a panic) leaves tasks stuck in it: a
container's exit that never ends, a wait that never returns. vmrun reads the console and
ends such a guest, as a dead helper's (seen in the soak: "VFS: Busy inodes after unmount
of virtiofs" then "kernel BUG at fs/super.c" as a container exited)."""

from __future__ import annotations

import time

from security.attacker import IN_GUEST_ROOT, attacker_bundle


def test_a_kernel_bug_on_the_console_ends_vmrun_run(vm_env):
    # Guest root writes the line to the kernel log at a level the console shows, as a BUG
    # would; without the watch the container would sleep on for 10 minutes.
    script = f"{IN_GUEST_ROOT} /bin/busybox sh -c \"echo '<2>kernel BUG at fake/test.c:1!' > /dev/kmsg\"; sleep 600"
    bundle = attacker_bundle(vm_env.base / "bundles" / "kbug", script)
    started = time.monotonic()
    result = vm_env.vmrun("run", "--bundle", str(bundle), "kbug", timeout=120)
    assert time.monotonic() - started < 60, "the guest lived on after its kernel failed"
    assert result.returncode != 0 and b"Traceback" not in result.stderr, result.stderr
