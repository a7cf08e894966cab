"""Pruning the builder's caches (built images, built kernels): the newest few stay."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable


def prune_keeping_newest(entries: Iterable[Path], keep_name: str, keep: int) -> None:
    """Remove all of `entries` but `keep_name` and the newest others, `keep` in all."""
    kept = 1
    for path in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True):
        if path.name == keep_name:
            continue
        if kept < keep:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
