"""A sandbox that fails to start takes its directory with it; its logs are kept here, so
the failure can be explained afterwards: `<run_dir>/failed/<time>-<sandbox id>/`, the
newest few only. Each log is capped where it is written (capped_log.py: 1 MiB, rotated
once), so what is kept is bounded too."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("vmrun.kept_logs")

LOG_NAMES = ("console.log", "qemu.log", "virtiofsd.log", "vsock-backend.log")
KEPT_FAILURES = 10


def keep_logs(sandbox_dir: Path, failed_dir: Path, sandbox_id: str, extra: list[Path] = ()) -> Path | None:
    """Copy the sandbox's logs (and their rotated halves), and the `extra` ones (the
    daemon's), to a new directory under `failed_dir`; that directory, or None if there was
    nothing to keep."""
    logs = [sandbox_dir / name for base in LOG_NAMES for name in (base + ".1", base)
            if (sandbox_dir / name).is_file()]
    logs += [path for path in extra if path.is_file()]
    if not logs:
        return None
    target = failed_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{sandbox_id[:64]}"
    try:
        failed_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.mkdir(mode=0o700)
        for path in logs:
            shutil.copyfile(path, target / path.name)
    except OSError as exc:
        log.warning("the failed sandbox's logs could not be kept: %s", exc)
        shutil.rmtree(target, ignore_errors=True)
        return None
    _prune(failed_dir)
    return target


def _prune(failed_dir: Path) -> None:
    kept = sorted((p for p in failed_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in kept[:-KEPT_FAILURES]:
        shutil.rmtree(old, ignore_errors=True)
