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
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from vmrun.agent.processes import Child, Reaper, Spawner
from vmrun.common.bpf import ARCH, JEQ_K, NR, RET_ALLOW, Program, arg_low, ret_errno, sock_fprog

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

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def filter_program() -> bytes:
    """The filter as struct sock_filter[]: pure, the same for every guest."""
    p = Program()
    p.load(ARCH)
    for arch, audit_arch in _ARCHES.items():
        p.jump(JEQ_K, audit_arch, arch)
    p.ret(RET_ALLOW)  # an ABI the guest's kernel does not have
    for arch in _ARCHES:
        p.label(arch)
        p.load(NR)
        if arch == "x86_64":
            p.and_(~_X32_SYSCALL_BIT & 0xFFFFFFFF)  # x32's numbers are x86_64's
        p.jump(JEQ_K, _SOCKET[arch], "domain")
        if arch in _SOCKETCALL:
            p.jump(JEQ_K, _SOCKETCALL[arch], "socketcall")
        for nr in IO_URING_SYSCALLS:
            p.jump(JEQ_K, nr, "deny")
        p.ret(RET_ALLOW)
    p.label("socketcall")
    p.load(arg_low(0))
    p.jump(JEQ_K, SYS_SOCKET, "deny")
    p.ret(RET_ALLOW)
    p.label("domain")
    p.load(arg_low(0))  # the kernel reads the domain as an int: its low 32 bits
    p.jump(JEQ_K, AF_VSOCK, "deny")
    p.ret(RET_ALLOW)
    p.label("deny")
    p.ret(ret_errno(errno.EPERM))
    return p.assemble()


def install_on_this_thread(program: bytes | None = None) -> None:
    """Load the filter on the calling thread only (no TSYNC), and without no_new_privs
    (the agent is root): a container's setuid programs keep working."""
    machine = os.uname().machine
    if machine not in SUPPORTED_MACHINES:
        raise OSError(errno.ENOTSUP, f"no vsock guard for {machine} guests")
    fprog, _buffer = sock_fprog(filter_program() if program is None else program)
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
