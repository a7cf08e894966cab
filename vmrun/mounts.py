"""Host mounts by file descriptor (the mount API of Linux 5.12+), and their removal.

A tree is cloned from its source (`open_tree`), given its flags while still detached
(`mount_setattr`: read-only, nosuid and nodev apply to every submount at once, and no
write can slip in before they do), and only then attached (`move_mount`). Unmounts never
follow a symbolic link.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
from pathlib import Path

from vmrun.common import linux
from vmrun.errors import HypervisorError

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers of the mount API are the same on every architecture (new since 5.1).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

_OPEN_TREE_CLONE = 0x1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def clone_tree(source: str | Path, attributes: int, recursive: bool = True) -> int:
    """A detached, private copy of the mount at `source` (with its submounts if
    `recursive`), with `attributes` (MOUNT_ATTR_*) set on all of it; an fd for `attach`,
    to be closed."""
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(source),  # AT_FDCWD
                              _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)),
                f"open_tree {source}")
    try:
        # Private: mounts made later under the copy stay there, and the source's stay there.
        attr = _MountAttr(attr_set=attributes, propagation=_MS_PRIVATE)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                             ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {source}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(tree_fd: int, target: str | Path) -> None:
    """Mount the detached tree `tree_fd` on `target`."""
    _check(_libc.syscall(_SYS_MOVE_MOUNT, tree_fd, b"", -100, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount onto {target}")


def bind(source: str | Path, target: str | Path, attributes: int, recursive: bool = True) -> None:
    """Bind the tree at `source` (its submounts too if `recursive`) on `target`, every
    mount of it with `attributes`."""
    fd = clone_tree(source, attributes, recursive)
    try:
        attach(fd, target)
    finally:
        os.close(fd)


def detach(target: str | Path) -> bool:
    """Lazily unmount whatever is mounted on `target` (a stack of mounts included) and
    everything under it, without following a link at its end; False when nothing was."""
    detached = False
    while _libc.umount2(os.fsencode(target), _MNT_DETACH | _UMOUNT_NOFOLLOW) == 0:
        detached = True
    err = ctypes.get_errno()
    if err in (22, 2):  # EINVAL: not (or no more) a mount point; ENOENT: not there
        return detached
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def outermost_mounts_under(path: Path) -> list[str]:
    """The mount points at or under `path` that lie under no other one of them: unmounting
    these (lazily) removes all, and no path inside a mounted tree is ever walked."""
    top = os.path.realpath(path)  # as the kernel lists them: /var/run/x is /run/x
    inside = sorted(p for p in linux.mount_points() if p == top or p.startswith(top + "/"))
    outermost: list[str] = []
    for point in inside:
        if not any(point == o or point.startswith(o + "/") for o in outermost):
            outermost.append(point)
    return outermost


def remove_tree_safely(path: Path) -> None:
    """Remove the directory `path`, but never through a mount: what is mounted there
    belongs to the user, so it is unmounted first (and if it cannot be, kept)."""
    for point in outermost_mounts_under(path):
        detach(point)
    if outermost_mounts_under(path):
        raise HypervisorError(f"cannot remove {path}: something is still mounted under it")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path, ignore_errors=True)  # rmtree never follows a symbolic link
