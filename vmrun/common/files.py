"""Atomic file writes, for the agent in the guest and for the host alike."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path | str, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` all at once: readers see the old or the new, never half.

    `mode`: the file's permissions (less the umask's bits) from the moment it exists, so it
    is never readable by others even briefly; None gives a new file's default.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a dead writer's leftover would keep its own mode
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode), "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before it replaces the old: a crash leaves one of them whole
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise


def write_json_atomic(path: Path | str, document: object, mode: int | None = None) -> None:
    write_atomic(path, json.dumps(document), mode)
