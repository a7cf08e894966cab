"""A failed sandbox's logs are kept, a bounded number of times."""

from __future__ import annotations

import os

import vmrun.kept_logs as kept_logs


def test_the_logs_and_their_rotated_halves_are_kept(tmp_path):
    sandbox = tmp_path / "vm"
    sandbox.mkdir()
    (sandbox / "qemu.log").write_text("qemu said why")
    (sandbox / "console.log.1").write_text("older console")
    (sandbox / "console.log").write_text("console")
    (sandbox / "qmp.sock").write_text("not a log")
    kept = kept_logs.keep_logs(sandbox, tmp_path / "failed", "pod1")
    assert kept is not None and kept.name.endswith("-pod1")
    assert sorted(p.name for p in kept.iterdir()) == ["console.log", "console.log.1", "qemu.log"]
    assert (kept / "qemu.log").read_text() == "qemu said why"


def test_nothing_to_keep_makes_nothing(tmp_path):
    (tmp_path / "vm").mkdir()
    assert kept_logs.keep_logs(tmp_path / "vm", tmp_path / "failed", "pod1") is None
    assert not (tmp_path / "failed").exists()


def test_only_the_newest_failures_stay(tmp_path, monkeypatch):
    failed = tmp_path / "failed"
    for index in range(kept_logs.KEPT_FAILURES + 3):
        old = failed / f"old{index:02d}"
        old.mkdir(parents=True)
        os.utime(old, (1000 + index, 1000 + index))
    sandbox = tmp_path / "vm"
    sandbox.mkdir()
    (sandbox / "qemu.log").write_text("x")
    kept = kept_logs.keep_logs(sandbox, failed, "new")
    left = sorted(p.name for p in failed.iterdir())
    assert len(left) == kept_logs.KEPT_FAILURES and kept.name in left and "old00" not in left
