"""World-writable places (/dev/shm): a local user who takes a name there first neither
stops vmrun nor gets to see what it puts there."""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.sandbox import Sandbox

NOBODY = 65534


def test_a_squatted_dev_shm_vmrun_neither_stops_clones_nor_receives_their_ram(vm_env):
    squatted = Path("/dev/shm/vmrun")  # where clones' RAM files used to go
    made = not squatted.exists()
    if made:
        squatted.mkdir(mode=0o777)
    before = squatted.lstat()
    os.chown(squatted, NOBODY, NOBODY)  # as if a local user had made it first
    try:
        vm_env.use_templates()
        with Sandbox("squatted", vm_env.config()) as sandbox:
            assert "clone_restored" in sandbox.timings, "the sandbox is a clone"
            assert list(squatted.iterdir()) == []
    finally:
        if made:
            squatted.rmdir()
        else:
            os.chown(squatted, before.st_uid, before.st_gid)
