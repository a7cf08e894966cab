"""The pod's cgroup on the host, where the processes that hold its guest run.

A guest can make its host helpers work (QEMU emulating its devices, virtiofsd serving its
files, the vsock backend its packets): that work must count against the pod, under the
limits its caller set on the cgroup it named (`linux.cgroupsPath` of the pod's first
container), not against the host. The process holding the guest (the sandbox daemon, or
`vmrun run`) joins that cgroup before it starts anything, so QEMU and every helper start
in it. No limits are written: the guest's RAM and QEMU's own overhead are far above what a
container's spec gives its processes; the caller sizes the pod's cgroup above it
(kubelet's pod cgroup with RuntimeClass overhead, as for Kata).

The path is the cgroupfs one; a systemd-style `slice:prefix:name` becomes the path
systemd would give that scope (`/a.slice/a-b.slice/prefix-name.scope`). Where systemd runs,
such a scope is made through systemd, as runc's systemd driver does: a transient scope unit
(StartTransientUnit over D-Bus, with busctl), delegated, holding the processes; systemd
removes it once it is empty. Elsewhere every mounted hierarchy is written directly:
cgroup v2, or each v1 controller and name=systemd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from vmrun.errors import CommandError, VmrunError
from vmrun.proc import run

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SYSTEMD_RUNTIME = Path("/run/systemd/system")  # there while systemd is the init (sd_booted)
_SYSTEMD_BUS = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
_ATTACH_TIMEOUT = 5.0
_SYSTEMD_STYLE = re.compile(r"^([^/:]*):([^/:]*):([^/:]+)$")


def _expand_slice(slice_name: str) -> str:
    """`a-b-c.slice` as systemd nests it: `/a.slice/a-b.slice/a-b-c.slice`."""
    if slice_name in ("", "-.slice"):
        return ""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise VmrunError(f"invalid systemd slice {slice_name!r} in linux.cgroupsPath")
    words = slice_name[: -len(".slice")].split("-")
    if any(not word for word in words):
        raise VmrunError(f"invalid systemd slice {slice_name!r} in linux.cgroupsPath")
    return "".join("/" + "-".join(words[: i + 1]) + ".slice" for i in range(len(words)))


def cgroup_path(spec: dict) -> str:
    """The host cgroup the spec names, as a path below each hierarchy's root; "" for none."""
    linux = spec.get("linux")
    raw = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not raw:
        return ""
    if not isinstance(raw, str):
        raise VmrunError("linux.cgroupsPath must be a string")
    systemd = _SYSTEMD_STYLE.match(raw)
    if systemd:
        slice_name, prefix, name = systemd.groups()
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return _expand_slice(slice_name or "system.slice") + "/" + unit
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise VmrunError(f"linux.cgroupsPath {raw!r} may not contain '..'")
    return "/" + "/".join(parts)


def hierarchies(mountinfo: str | None = None) -> list[Path]:
    """Where each cgroup hierarchy is mounted (v2, and every v1 one), under /sys/fs/cgroup:
    a cgroup mount elsewhere (one a container's rootfs brought along, say) is not ours."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    found: list[Path] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        fs_type = fields[fields.index("-") + 1]
        point = Path(fields[4])
        if (fs_type in ("cgroup", "cgroup2") and fields[3] == "/" and point not in found
                and (point == _CGROUP_ROOT or _CGROUP_ROOT in point.parents)):
            found.append(point)
    return found


def systemd_running() -> bool:
    return _SYSTEMD_RUNTIME.is_dir()


def _busctl(method: str, signature: str, *arguments: object) -> None:
    try:
        run(["busctl", "call", *_SYSTEMD_BUS, method, signature, *map(str, arguments)], timeout=30)
    except CommandError as exc:
        raise VmrunError(f"systemd: {method}: {exc}") from None


@dataclass(frozen=True)
class HostCgroup:
    path: str  # e.g. "/kubepods/besteffort/pod1234/abcd"

    def directories(self) -> list[Path]:
        return [root / self.path.lstrip("/") for root in hierarchies()]

    @property
    def systemd_scope(self) -> tuple[str, str] | None:
        """(slice, scope unit) where the path is a systemd scope's and systemd runs."""
        parts = [part for part in self.path.split("/") if part]
        if not parts or not parts[-1].endswith(".scope") or not systemd_running():
            return None
        return (parts[-2] if len(parts) > 1 else "-.slice"), parts[-1]

    def join(self, pids: Iterable[int] = ()) -> None:
        """Move `pids` (by default this process, and so whatever it starts) into the
        cgroup, made if need be; if that fails half-way, this process leaves again (when
        it was the one to join)."""
        others = list(pids)
        scope = self.systemd_scope
        if scope is not None:
            self._join_scope(*scope, others or [os.getpid()])
            return
        for directory in self.directories():
            try:
                _make(directory)
                for pid in others or [os.getpid()]:
                    (directory / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                # Only this process leaves: the others' starter deals with them.
                self.remove() if others else self.leave_and_remove()
                raise VmrunError(f"cannot join the pod's cgroup {directory}: {exc.strerror or exc}") from None

    def _join_scope(self, slice_name: str, unit: str, pids: list[int]) -> None:
        """The scope unit made by systemd with `pids` in it; or, if it exists already (an
        exec's shim joining its container's), `pids` attached to it."""
        try:
            _busctl("StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "replace", 4,
                    "Slice", "s", slice_name, "Delegate", "b", "true", "DefaultDependencies", "b", "false",
                    "PIDs", "au", len(pids), *pids, 0)
        except VmrunError as exc:
            if "exists" not in str(exc):
                raise
            _busctl("AttachProcessesToUnit", "ssau", unit, "", len(pids), *pids)
        # systemd moves them as the unit's job runs: wait until they are there.
        deadline = time.monotonic() + _ATTACH_TIMEOUT
        while not all(self._holds(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise VmrunError(f"systemd did not move the pod's processes into {unit}")
            time.sleep(0.01)

    def _holds(self, pid: int) -> bool:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return True  # gone: nothing left to wait for
        return any(line.split(":", 2)[2] == self.path for line in lines)

    def leave_and_remove(self) -> None:
        """Move this process to each hierarchy's root (which takes a process whatever its
        controllers; a parent may not) and remove the cgroup, once nothing else is in it:
        for the process that joined it, as its last step."""
        for root in hierarchies():
            try:
                (root / "cgroup.procs").write_text(str(os.getpid()))
            except OSError:
                continue
        self.remove()

    def remove(self) -> None:
        """Remove the cgroup where it is empty (its parents are the caller's). A systemd
        scope goes by itself once empty."""
        if self.systemd_scope is not None:
            return
        for directory in self.directories():
            try:
                directory.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise VmrunError(f"cannot remove the pod's cgroup {directory}: {exc.strerror}") from None


@contextlib.contextmanager
def joined(path: str) -> Iterator[None]:
    """This process, and so what it starts meanwhile, in the cgroup `path` (if any)."""
    if not path:
        yield
        return
    cgroup = HostCgroup(path)
    cgroup.join()
    try:
        yield
    finally:
        cgroup.leave_and_remove()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a pooled guest's daemon and its helpers)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            try:
                tree += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
        index += 1
    return tree


def _make(directory: Path) -> None:
    if directory.is_dir():
        return
    _make(directory.parent)
    directory.mkdir()
    # A new v1 cpuset has no CPUs nor memory nodes: nothing could join it. Its parent's.
    for name in ("cpuset.cpus", "cpuset.mems"):
        inherited = directory.parent / name
        if inherited.exists() and (directory / name).exists() and not (directory / name).read_text().strip():
            (directory / name).write_text(inherited.read_text())
