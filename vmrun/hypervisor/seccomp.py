"""Seccomp for the host's helpers: a small classic-BPF assembler, the filter that keeps
setuid/setgid bits and device nodes made by a guest off the host, and its loading.

Standard library only: it runs in `python -S` just before virtiofsd is executed
(virtiofsd_seccomp.py), where every millisecond is on the sandbox's start.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
from dataclasses import dataclass, field

# struct sock_filter: code, jt, jf, k.
_INSN = struct.Struct("=HBBI")
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

RET_KILL_PROCESS = 0x80000000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000


def ret_errno(number: int) -> int:
    return 0x00050000 | number


# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args (u64[6]).
_NR, _ARCH = 0, 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index  # the low 32 bits of a 64-bit argument (little-endian)


def _arg_high(index: int) -> int:
    return 20 + 8 * index


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


@dataclass
class Program:
    """Classic BPF with forward jumps to labels, resolved by `assemble`."""

    insns: list[tuple[int, object, object, int]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def load(self, offset: int) -> None:
        self.insns.append((_LD_W_ABS, 0, 0, offset))

    def and_(self, mask: int) -> None:
        self.insns.append((_ALU_AND_K, 0, 0, mask))

    def jump(self, code: int, k: int, if_true: str | int = 0, if_false: str | int = 0) -> None:
        self.insns.append((code, if_true, if_false, k))

    def ret(self, value: int) -> None:
        self.insns.append((_RET_K, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def assemble(self) -> bytes:
        out = b""
        for index, (code, jt, jf, k) in enumerate(self.insns):
            out += _INSN.pack(code, self._offset(index, jt), self._offset(index, jf), k)
        return out

    def _offset(self, index: int, target: object) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[str(target)] - index - 1
        assert 0 <= offset < 256, f"jump to {target} out of range"
        return offset


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
    p.load(_ARCH)
    p.jump(_JEQ_K, arch.audit, 0, "kill")
    p.load(_NR)
    if arch.nr_limit is not None:
        p.jump(_JGE_K, arch.nr_limit, "kill", 0)
    rules = [(name, index, "notify") for name, index in _CHMODS.items()]
    rules += [(name, index, "refuse") for name, index in _CREATES.items()]
    rules += [(name, index, "node") for name, index in _MKNODS.items()]
    for number, (name, index, kind) in enumerate(rules):
        if name not in arch.syscalls:
            continue
        p.jump(_JEQ_K, arch.syscalls[name], 0, f"next{number}")
        p.load(_arg_low(index))
        p.jump(_JSET_K, _SET_ID_BITS, "notify" if kind == "notify" else "eperm", 0)
        if kind == "node":
            p.and_(0o170000)  # S_IFMT
            p.jump(_JEQ_K, stat.S_IFBLK, "eperm", 0)
            p.jump(_JEQ_K, stat.S_IFCHR, 0, "allow")
            p.load(_arg_low(index + 1))  # the device number: only 0/0 (a whiteout) passes
            p.jump(_JEQ_K, 0, 0, "eperm")
            p.load(_arg_high(index + 1))
            p.jump(_JEQ_K, 0, "allow", "eperm")
        else:
            p.ret(RET_ALLOW)
        p.label(f"next{number}")
        p.load(_NR)
    p.jump(_JEQ_K, arch.syscalls["openat2"], 0, "allow")
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


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_with_listener(program: bytes, arch: Arch) -> int:
    """Install `program` on the calling thread (inherited by what it executes); the fd on
    which its RET_USER_NOTIF calls arrive."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN.size, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fd = libc.syscall(arch.seccomp_nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER,
                      ctypes.byref(fprog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
    return fd
