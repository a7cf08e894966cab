"""Only the agent talks to the host: no container process may get an AF_VSOCK socket.

The host's vsock ports (the sandbox's, its vsock backend's) answer whatever connects from
the guest. So the agent starts every crun process (create, run, exec) from one thread of
its own that carries a seccomp filter (GuardedSpawner): crun, the containers it makes and
every process exec'd into them inherit the filter, and no process can shed it. A
container's own profile (`linux.seccomp`) is a second filter beside it; the kernel runs
both and the stricter verdict wins, so no profile, listener or notify agent can allow what
this one refuses, and the profile is left as its author wrote it.

Not a rule merged into the spec: with the guest's crun 1.8.1 and libseccomp 2.5.4
(measured in a guest), a profile's unconditional rule for socket silently wipes a
conditional deny of AF_VSOCK (x86_64 only), or fails the container with EEXIST (with
x86 and x32, where both become rules for socketcall(SYS_SOCKET)), as does a profile's own
rule for AF_VSOCK; and crun skips a rule whose action is the profile's default.

The filter refuses, with EPERM:
- socket(AF_VSOCK, ...), on the domain's low 32 bits: the kernel reads it as an int, so a
  value with other high bits is AF_VSOCK as well;
- io_uring_setup, io_uring_enter, io_uring_register: IORING_OP_SOCKET makes sockets
  without socket(2) (Docker's default profile refuses io_uring too);
- on 32-bit x86, socketcall(SYS_SOCKET), whatever the domain: it is behind a pointer the
  filter cannot read. 32-bit glibc makes every socket this way, so 32-bit x86 programs
  get no sockets (their direct socket(2), syscall 359, is filtered as on 64-bit).
socketpair is left alone: the kernel has no AF_VSOCK pairs (EOPNOTSUPP).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from vmrun.agent.processes import Child, Reaper, Spawner

AF_VSOCK = 40
SYS_SOCKET = 1  # socketcall's call number for socket()
IO_URING_SYSCALLS = (425, 426, 427)  # io_uring_setup, _enter, _register: one number on every arch

# seccomp_data's arch (AUDIT_ARCH_*), with that ABI's socket and socketcall numbers. x32 is
# x86_64 with __X32_SYSCALL_BIT set; compat ARM (under aarch64) has no socketcall.
_X32_SYSCALL_BIT = 0x40000000
_ARCHES = {
    "x86_64": 0xC000003E,
    "i386": 0x40000003,
    "aarch64": 0xC00000B7,
    "arm": 0x40000028,
}
_SOCKET = {"x86_64": 41, "i386": 359, "aarch64": 198, "arm": 281}
_SOCKETCALL = {"i386": 102}
# The guest machines (os.uname().machine) whose every ABI the filter covers.
SUPPORTED_MACHINES = ("x86_64", "aarch64")

# Classic BPF, as seccomp runs it.
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_RET_K = 0x06
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # args[0]'s low 32 bits: the guest is little-endian

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions; jumps are written as labels and resolved below."""
    code: list[tuple] = [("ld", _ARCH)]
    for arch, audit_arch in _ARCHES.items():
        code.append(("jeq", audit_arch, arch))
    code.append(("ret", _SECCOMP_RET_ALLOW))  # an ABI the guest's kernel does not have
    for arch in _ARCHES:
        code += [("label", arch), ("ld", _NR)]
        if arch == "x86_64":
            code.append(("and", ~_X32_SYSCALL_BIT & 0xFFFFFFFF))  # x32's numbers are x86_64's
        code.append(("jeq", _SOCKET[arch], "domain"))
        if arch in _SOCKETCALL:
            code.append(("jeq", _SOCKETCALL[arch], "socketcall"))
        code += [("jeq", nr, "deny") for nr in IO_URING_SYSCALLS]
        code.append(("ret", _SECCOMP_RET_ALLOW))
    code += [
        ("label", "socketcall"), ("ld", _ARG0_LOW), ("jeq", SYS_SOCKET, "deny"), ("ret", _SECCOMP_RET_ALLOW),
        ("label", "domain"), ("ld", _ARG0_LOW), ("jeq", AF_VSOCK, "deny"), ("ret", _SECCOMP_RET_ALLOW),
        ("label", "deny"), ("ret", _SECCOMP_RET_ERRNO | errno.EPERM),
    ]
    labels: dict[str, int] = {}
    position = 0
    for op in code:  # a label is the position of the instruction after it
        if op[0] == "label":
            labels[op[1]] = position
        else:
            position += 1
    out: list[tuple[int, int, int, int]] = []
    for op in code:
        kind = op[0]
        if kind == "ld":
            out.append((_LD_W_ABS, 0, 0, op[1]))
        elif kind == "and":
            out.append((_ALU_AND_K, 0, 0, op[1]))
        elif kind == "ret":
            out.append((_RET_K, 0, 0, op[1]))
        elif kind == "jeq":  # to the label if equal, else on to the next instruction
            out.append((_JEQ_K, labels[op[2]] - len(out) - 1, 0, op[1]))
    return out


def filter_program() -> bytes:
    """The filter as struct sock_filter[]: pure, the same for every guest."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in _program())


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_on_this_thread(program: bytes | None = None) -> None:
    """Load the filter on the calling thread only (no TSYNC), and without no_new_privs
    (the agent is root): a container's setuid programs keep working."""
    machine = os.uname().machine
    if machine not in SUPPORTED_MACHINES:
        raise OSError(errno.ENOTSUP, f"no vsock guard for {machine} guests")
    program = filter_program() if program is None else program
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"vsock guard: seccomp filter not loaded: {os.strerror(err)}")


class GuardedSpawner(Spawner):
    """A Spawner whose children start from the guarded thread, made on first use.

    Fails closed: where the filter cannot be loaded, nothing is spawned."""

    def __init__(self, reaper: Reaper):
        super().__init__(reaper)
        self._refusal: OSError | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsock-guard", initializer=self._guard)

    def _guard(self) -> None:
        try:
            install_on_this_thread()
        except OSError as exc:
            self._refusal = exc

    def _spawn_guarded(self, argv: Sequence[str], **kwargs) -> Child:
        if self._refusal is not None:
            raise OSError(self._refusal.errno, str(self._refusal))
        return super().spawn(argv, **kwargs)

    def spawn(self, argv: Sequence[str], *, stdin: int, stdout: int, stderr: int,
              env: Mapping[str, str] | None = None) -> Child:
        return self._thread.submit(self._spawn_guarded, argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                   env=env).result()
