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


# ---- what a whole test session may leave on the host, of vmrun's

_VMRUN_PROCESS_MARKERS = ("vmrun.shim", "vmrun.sandbox_daemon", "vmrun.hypervisor.vsock.vhost_user",
                          "-name vmrun-", "vmrun.cli pool serve", "vmrun.hypervisor.seccomp_exec")
_VMRUN_PATH_PREFIXES = ("/tmp/vmrun-", "/run/vmrun", "/var/lib/vmrun", "/var/tmp/vmrun-", "/tmp/vdk-", "/tmp/vpm-")


def vmrun_host_footprint() -> set[str]:
    """Every trace of vmrun on the host, one line each: processes (shims, daemons, vsock
    backends, QEMU guests, virtiofsd serving a sandbox), mounts and network namespaces of
    its tests' and its own directories, host links it names *_vmrun, virtiofsd pid files."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in _VMRUN_PROCESS_MARKERS) or (
                "virtiofsd" in cmdline.split(" ", 1)[0] and "/vm/" in cmdline):
            found.add(f"process {proc.name}: {cmdline[:160]}")
    found.update(f"mount {point}" for point in mount_points() if point.startswith(_VMRUN_PATH_PREFIXES))
    netns = Path("/run/netns")
    found.update(f"netns {entry.name}" for entry in (netns.iterdir() if netns.is_dir() else ())
                 if entry.name.startswith("vmrun-"))
    found.update(f"link {link.name}" for link in Path("/sys/class/net").iterdir() if link.name.endswith("_vmrun"))
    pid_files = Path("/var/run/virtiofsd")
    found.update(f"virtiofsd pid file {entry}" for entry in (pid_files.iterdir() if pid_files.is_dir() else ()))
    return found
