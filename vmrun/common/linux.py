"""Small Linux system calls without util-linux: used by the agent in the guest and by the
host (mount lists, namespaces, holes in files)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import socket
import struct
import time

from vmrun.common.constants import CMDLINE_PREFIX

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_CHILD_SUBREAPER = 36
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if not os.path.exists(target):
        os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def bind_mount(source: str, target: str, readonly: bool = False) -> None:
    mount(source, target, "none", MS_BIND | MS_REC)
    if readonly:
        # A bind mount only becomes read-only through a remount.
        mount("none", target, "none", MS_BIND | MS_REMOUNT | MS_RDONLY)


def pin_read_only_copy(path: str, store: str) -> None:
    """Put a copy of the file `path` on a read-only ramfs mounted at `store`, and
    bind-mount that copy over `path`: nothing in the guest can change it any more."""
    mount("ramfs", store, "ramfs", MS_NOSUID | MS_NODEV, "mode=0755")
    copy = os.path.join(store, os.path.basename(path))
    shutil.copy2(path, copy)
    mount("none", store, "none", MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    mount(copy, path, "none", MS_BIND)


def umount(target: str, detach: bool = False) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Every mount point, decoded (the kernel writes space, tab, newline, \\ as \\ooo)."""
    with open("/proc/self/mounts") as mounts:
        return [_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split(" ")[1]) for line in mounts]


def is_mounted(target: str) -> bool:
    return target in mount_points()


def mount_with_retry(source: str, target: str, fstype: str, timeout: float) -> None:
    """Mount, retrying while the device is not there yet (it may be hot-plugged)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            mount(source, target, fstype)
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def set_hostname(name: str) -> None:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)


def set_clock(epoch_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, epoch_ns)


_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def add_entropy(data: bytes) -> None:
    """Credit fresh host entropy to the guest's pool and reseed its CRNG at once.

    A clone restored from a template starts with the template's RNG state: without an
    immediate reseed, clones could hand out the same "random" bytes.
    """
    with open("/dev/urandom", "wb") as f:
        info = struct.pack("ii", len(data) * 8, len(data)) + data  # struct rand_pool_info
        try:
            fcntl.ioctl(f, _RNDADDENTROPY, info)
            fcntl.ioctl(f, _RNDRESEEDCRNG)
        except OSError:
            f.write(data)  # without CAP_SYS_ADMIN: mixed in, uncredited


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace `fd` refers to (of type `nstype`)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ_FLAGS = struct.Struct("16sh22x")  # struct ifreq: the name, then ifr_flags


def unshare(flags: int) -> None:
    """unshare(2) for the calling thread (Python 3.11's os has none)."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def set_link_up(name: str) -> None:
    """Bring the link `name` up, in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ_FLAGS.pack(name.encode(), 0)
        _, flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | _IFF_UP))


_FALLOC_FL_KEEP_SIZE = 0x1
_FALLOC_FL_PUNCH_HOLE = 0x2
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a byte range of a file (it reads as zeros), keeping the file's size."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def become_subreaper() -> None:
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kernel_cmdline() -> dict[str, str]:
    """`vmrun.*` parameters from the kernel command line, without their prefix."""
    try:
        words = open("/proc/cmdline").read().split()
    except OSError:
        return {}
    params = {}
    for word in words:
        if word.startswith(CMDLINE_PREFIX):
            key, _, value = word[len(CMDLINE_PREFIX):].partition("=")
            params[key] = value
    return params


def pid_exists(pid: int) -> bool:
    """Whether a process (a zombie included) holds `pid`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
