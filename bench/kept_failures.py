"""A failed bench run's logs, kept: a bench removes its private directory when it ends."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def keep_failed_logs(run_dir: Path, prefix: str, *extra: Path) -> Path:
    """Copy the sandboxes' kept logs (`run_dir`/failed) and `extra` files into a new
    directory in /tmp; its path."""
    kept = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if (run_dir / "failed").is_dir():
        shutil.copytree(run_dir / "failed", kept, dirs_exist_ok=True)
    for path in extra:
        if path.is_file():
            shutil.copy2(path, kept / path.name)
    return kept
