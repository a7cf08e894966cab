"""Which mounts a sandbox's teardown unmounts: the outermost under its directory only, so
that no path inside a mounted tree (the guest's to write) is ever walked."""

from __future__ import annotations

from pathlib import Path

from vmrun import mounts


def test_only_the_outermost_mounts_under_a_directory_are_taken(monkeypatch):
    monkeypatch.setattr(mounts.linux, "mount_points", lambda: [
        "/", "/run", "/run/vm/a/shared", "/run/vm/a/shared/c1/rootfs", "/run/vm/a/shared/c1/rootfs/proc",
        "/run/vm/a/shared/c1/mounts/0", "/run/vm/ab/shared", "/run/vm/a-b",
    ])
    assert mounts.outermost_mounts_under(Path("/run/vm/a")) == ["/run/vm/a/shared"]
    assert mounts.outermost_mounts_under(Path("/run/vm/a/shared/c1")) == [
        "/run/vm/a/shared/c1/mounts/0", "/run/vm/a/shared/c1/rootfs"]
    assert mounts.outermost_mounts_under(Path("/run/vm/none")) == []
