"""Atomic file writes, for the agent in the guest and for the host alike."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path | str, text: str) -> None:
    """Replace `path` with `text` all at once: readers see the old or the new, never half."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def write_json_atomic(path: Path | str, document: object) -> None:
    write_atomic(path, json.dumps(document))
