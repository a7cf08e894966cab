"""The state root under trouble: a full disk, a stray file."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


@pytest.fixture
def small_root(vm_env):
    """A 64 KiB tmpfs as --root, filled up: no state fits."""
    root = vm_env.base / "small-root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)], check=True)
    try:
        filler = root / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        yield root, filler
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_a_full_disk_fails_run_cleanly_and_keeps_the_id_free(vm_env, small_root):
    root, filler = small_root
    bundle = vm_env.bundle("full", ["echo", "ran"])
    cli = [*vm_env.cli()[:-2], "--root", str(root)]
    result = subprocess.run([*cli, "run", "--bundle", str(bundle), "full"], capture_output=True, env=vm_env.env,
                            timeout=180)
    assert result.returncode != 0
    assert result.stderr.decode().strip().splitlines() == [
        f"vmrun: cannot record container 'full' in {root}: No space left on device"], result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["filler"]  # nothing half-made holds the id
    filler.unlink()
    result = subprocess.run([*cli, "run", "--bundle", str(bundle), "full"], capture_output=True, env=vm_env.env,
                            timeout=180)
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr


def test_a_stray_file_in_the_root_does_not_break_list(vm_env):
    bundle = vm_env.bundle("listed", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "listed", detached=True).returncode == 0
    try:
        (vm_env.root / "not a container").write_text("stray")
        listing = vm_env.vmrun("list", "--format", "json")
        assert listing.returncode == 0, listing.stderr
        assert [c["id"] for c in json.loads(listing.stdout)] == ["listed"]
        assert b"not a container" in listing.stderr  # a warning says what was skipped
    finally:
        (vm_env.root / "not a container").unlink()
        assert vm_env.vmrun("delete", "--force", "listed").returncode == 0
