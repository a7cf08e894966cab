"""What a test may have left behind: processes that name its directories, mounts under them;
and waiting for the system to settle.

Shared by the integration and client fixtures (tests/ is on the import path: its
conftest.py puts it there).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

from vmrun.common.linux import mount_points


def scan_processes(text: str) -> Iterator[tuple[int, str]]:
    """(pid, command line) of each process whose command line or environment contains
    `text`: a sandbox daemon names no path, but carries VMRUN_CONFIG in its environment."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            yield int(proc.name), cmdline


def processes_mentioning(text: str, exclude: tuple[int, ...] = ()) -> list[str]:
    """The processes scan_processes finds but this one and `exclude`, as report lines."""
    return [f"{pid}: {cmdline[:200]}" for pid, cmdline in scan_processes(text)
            if pid not in (os.getpid(), *exclude)]


def mounts_under(path: str | Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [p for p in mount_points() if p.startswith(prefix) or p == str(path)]


def clone_memory_of(vm_dir: Path) -> Path | None:
    """Where the RAM of the clone living in `vm_dir` can be opened (its QEMU's fd of the
    memfd the sandbox made); None for a booted guest, or none running."""
    name = f"/memfd:vmrun-clone-{vm_dir.name}"
    for pid, cmdline in scan_processes(str(vm_dir)):
        if "qemu-system" not in cmdline:
            continue
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd).startswith(name):
                    return fd
            except OSError:
                continue
    return None


def client_session(env, *start_steps):
    """For a fixture: `env` started by `start_steps`, yielded, then closed. What its close
    finds left behind fails the test; when it never started, that is printed and the start's
    own error raised."""
    try:
        for step in start_steps:
            step()
    except BaseException:
        problems = env.close()
        if problems:
            print("\n".join(problems))
        raise
    yield env
    problems = env.close()
    assert not problems, "\n".join(problems)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """The first true value of `predicate()`, polled every `interval`; AssertionError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}: not met within {timeout:.0f}s")
        time.sleep(interval)
