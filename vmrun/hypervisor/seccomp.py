"""Seccomp for the host's helpers: the filter that keeps setuid/setgid bits and device
nodes made by a guest off the host, and its loading.

Standard library only: it runs in `python -S` just before virtiofsd is executed
(seccomp_exec.py), where every millisecond is on the sandbox's start.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from dataclasses import dataclass

from vmrun.common.bpf import (ARCH, JEQ_K, JGE_K, JSET_K, NR, RET_ALLOW, RET_KILL_PROCESS, RET_USER_NOTIF,
                              Program, arg_high, arg_low, ret_errno, sock_fprog)


@dataclass(frozen=True)
class Arch:
    audit: int  # AUDIT_ARCH_*
    seccomp_nr: int  # seccomp(2)
    syscalls: dict[str, int]
    # x86_64's x32 ABI shares the audit arch and sets this bit in nr.
    nr_limit: int | None = None


# Syscall numbers the filter names. The *at2 and newer calls share one table on every
# architecture; aarch64 has no chmod, open, creat or mknod.
_COMMON = {"openat2": 437, "fchmodat2": 452}
ARCHES = {
    "x86_64": Arch(0xC000003E, 317, {"open": 2, "creat": 85, "chmod": 90, "fchmod": 91, "mknod": 133,
                                     "openat": 257, "mknodat": 259, "fchmodat": 268, **_COMMON}, 0x40000000),
    "aarch64": Arch(0xC00000B7, 277, {"fchmod": 52, "fchmodat": 53, "mknodat": 33, "openat": 56, **_COMMON}),
}


def native_arch() -> Arch:
    machine = platform.machine()
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {machine}")
    return ARCHES[machine]


# Which argument of each call is its mode.
_CHMODS = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2}
_CREATES = {"creat": 1, "open": 2, "openat": 3}
_MKNODS = {"mknod": 1, "mknodat": 2}
_SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


def set_id_filter(arch: Arch) -> bytes:
    """The filter for a process serving a guest's files (virtiofsd):
    - chmod with S_ISUID/S_ISGID goes to the supervisor (RET_USER_NOTIF), which applies
      the mode without them (mode_supervisor.py): package installs in the guest still work;
    - creating a file with those bits, and device nodes (not FIFOs, nor the 0/0 whiteout
      overlayfs uses), fail with EPERM;
    - openat2 fails with ENOSYS, as if the kernel were older: its mode is in a struct the
      filter cannot read, and callers fall back to openat;
    - any other ABI (i386, x32) kills the process."""
    p = Program()
    eperm = ret_errno(errno.EPERM)
    p.load(ARCH)
    p.jump(JEQ_K, arch.audit, 0, "kill")
    p.load(NR)
    if arch.nr_limit is not None:
        p.jump(JGE_K, arch.nr_limit, "kill", 0)
    rules = [(name, index, "notify") for name, index in _CHMODS.items()]
    rules += [(name, index, "refuse") for name, index in _CREATES.items()]
    rules += [(name, index, "node") for name, index in _MKNODS.items()]
    for number, (name, index, kind) in enumerate(rules):
        if name not in arch.syscalls:
            continue
        p.jump(JEQ_K, arch.syscalls[name], 0, f"next{number}")
        p.load(arg_low(index))
        p.jump(JSET_K, _SET_ID_BITS, "notify" if kind == "notify" else "eperm", 0)
        if kind == "node":
            p.and_(0o170000)  # S_IFMT
            p.jump(JEQ_K, stat.S_IFBLK, "eperm", 0)
            p.jump(JEQ_K, stat.S_IFCHR, 0, "allow")
            p.load(arg_low(index + 1))  # the device number: only 0/0 (a whiteout) passes
            p.jump(JEQ_K, 0, 0, "eperm")
            p.load(arg_high(index + 1))
            p.jump(JEQ_K, 0, "allow", "eperm")
        else:
            p.ret(RET_ALLOW)
        p.label(f"next{number}")
        p.load(NR)
    p.jump(JEQ_K, arch.syscalls["openat2"], 0, "allow")
    p.ret(ret_errno(errno.ENOSYS))
    p.label("allow")
    p.ret(RET_ALLOW)
    p.label("notify")
    p.ret(RET_USER_NOTIF)
    p.label("eperm")
    p.ret(eperm)
    p.label("kill")
    p.ret(RET_KILL_PROCESS)
    return p.assemble()


# ---- loading ----

_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


def load_with_listener(program: bytes, arch: Arch) -> int:
    """Install `program` on the calling thread (inherited by what it executes); the fd on
    which its RET_USER_NOTIF calls arrive."""
    libc = ctypes.CDLL(None, use_errno=True)
    fprog, _buffer = sock_fprog(program)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fd = libc.syscall(arch.seccomp_nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER,
                      ctypes.byref(fprog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
    return fd
