"""What a test may have left behind: processes that name its directories, mounts under them.

Shared by the integration and client fixtures (tests/ is on the import path: its
conftest.py puts it there).
"""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.agent.linux import mount_points


def processes_mentioning(text: str, exclude: tuple[int, ...] = ()) -> list[str]:
    """Processes (not this one, not `exclude`) whose command line or environment contains
    `text`: a sandbox daemon names no path, but carries VMRUN_CONFIG in its environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (os.getpid(), *exclude):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def mounts_under(path: str | Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [p for p in mount_points() if p.startswith(prefix) or p == str(path)]
