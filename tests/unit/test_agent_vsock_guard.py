"""The vsock guard: its filter, run here by a small BPF interpreter for every ABI, then
loaded for real on a guarded thread whose children are refused AF_VSOCK."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from vmrun.agent import vsock_guard
from vmrun.agent.processes import Reaper
from vmrun.agent.vsock_guard import GuardedSpawner, filter_program

ALLOW = 0x7FFF0000
EPERM = 0x00050000 | errno.EPERM
X86_64, I386, AARCH64, ARM = 0xC000003E, 0x40000003, 0xC00000B7, 0x40000028
X32 = 0x40000000
AF_INET, AF_UNIX, AF_VSOCK = 2, 1, 40


def run_filter(arch: int, nr: int, *args: int) -> int:
    """What seccomp returns for this call: the classic BPF subset the filter uses."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    program = [struct.unpack("=HBBI", filter_program()[i:i + 8]) for i in range(0, len(filter_program()), 8)]
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # and #k
            accumulator &= k
        elif code == 0x15:  # jeq #k
            pc += jt if accumulator == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")


@pytest.mark.parametrize("arch, nr, args, verdict", [
    # x86_64: socket is 41; only its AF_VSOCK domain, read as the kernel reads an int.
    (X86_64, 41, (AF_VSOCK, 1, 0), EPERM),
    (X86_64, 41, ((1 << 32) | AF_VSOCK, 1, 0), EPERM),
    (X86_64, 41, (AF_INET, 2, 0), ALLOW),
    (X86_64, 41, (AF_UNIX, 1, 0), ALLOW),
    (X86_64, 53, (AF_VSOCK, 1, 0), ALLOW),  # socketpair: the kernel has no vsock pairs
    (X86_64, 425, (), EPERM), (X86_64, 426, (), EPERM), (X86_64, 427, (), EPERM),  # io_uring
    (X86_64, 0, (), ALLOW), (X86_64, 42, (3, 0, 0), ALLOW),  # read, connect
    # x32: x86_64's numbers with bit 30.
    (X86_64, X32 | 41, (AF_VSOCK,), EPERM), (X86_64, X32 | 41, (AF_INET,), ALLOW), (X86_64, X32 | 425, (), EPERM),
    # i386 (also `int $0x80` from a 64-bit process): socket 359, socketcall 102.
    (I386, 359, (AF_VSOCK, 1, 0), EPERM), (I386, 359, (AF_INET, 1, 0), ALLOW),
    (I386, 102, (1, 0x1000), EPERM),  # socketcall(SYS_SOCKET): its domain is behind a pointer
    (I386, 102, (3, 0x1000), ALLOW),  # socketcall(SYS_CONNECT)
    (I386, 425, (), EPERM), (I386, 41, (AF_VSOCK,), ALLOW),  # 41 is dup there
    # aarch64, and compat ARM under it.
    (AARCH64, 198, (AF_VSOCK, 1, 0), EPERM), (AARCH64, 198, (AF_INET, 1, 0), ALLOW), (AARCH64, 425, (), EPERM),
    (ARM, 281, (AF_VSOCK, 1, 0), EPERM), (ARM, 281, (AF_INET, 1, 0), ALLOW), (ARM, 426, (), EPERM),
    (0x12345678, 41, (AF_VSOCK,), ALLOW),  # no such ABI in the guest
])
def test_the_filter_refuses_vsock_and_io_uring_only(arch, nr, args, verdict):
    assert run_filter(arch, nr, *args) == verdict


def test_the_filter_is_a_valid_program():
    program = filter_program()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096  # BPF_MAXINSNS


def _guard_here() -> bool:
    if os.geteuid() != 0:
        return False  # without no_new_privs, loading a filter takes CAP_SYS_ADMIN
    return os.uname().machine in vsock_guard.SUPPORTED_MACHINES


@pytest.mark.skipif(not _guard_here(), reason="needs root on an x86_64 or aarch64 host")
def test_children_of_the_guarded_thread_get_no_vsock_socket_and_the_agent_keeps_its_own():
    child = textwrap.dedent("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(nr, *args):
            result = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
            return "allowed" if result >= 0 else errno.errorcode[ctypes.get_errno()]
        NR = {"x86_64": (41, 425), "aarch64": (198, 425)}[os.uname().machine]
        params = ctypes.create_string_buffer(120)
        print("vsock", attempt(NR[0], 40, 1, 0))
        print("vsock-high-bits", attempt(NR[0], (1 << 32) | 40, 1, 0))
        print("io_uring", attempt(NR[1], 4, ctypes.addressof(params)))
        print("unix", attempt(NR[0], 1, 1, 0))
    """)
    agent = textwrap.dedent(f"""
        import errno, socket
        from vmrun.agent.processes import Reaper
        from vmrun.agent.vsock_guard import GuardedSpawner
        result = GuardedSpawner(Reaper().start()).run([{sys.executable!r}, "-c", {child!r}])
        print(result.stdout.decode() + result.stderr.decode(), end="")
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
            print("agent allowed")
        except OSError as exc:  # a host without vsock: anything but the guard's EPERM
            print("agent", errno.errorcode[exc.errno])
    """)
    # In a process of its own: its reaper waits for every child.
    shown = subprocess.run([sys.executable, "-c", agent], capture_output=True, text=True, timeout=60)
    outcomes = dict(line.split(" ", 1) for line in shown.stdout.splitlines())
    assert outcomes.pop("agent") != "EPERM", shown
    assert outcomes == {"vsock": "EPERM", "vsock-high-bits": "EPERM", "io_uring": "EPERM", "unix": "allowed"}, shown


def test_no_filter_no_spawn(monkeypatch):
    """Fails closed: a guard that cannot be loaded starts no crun."""
    def refuse() -> None:
        raise OSError(errno.EINVAL, "vsock guard: seccomp filter not loaded")

    monkeypatch.setattr(vsock_guard, "install_on_this_thread", refuse)
    spawner = GuardedSpawner(Reaper())
    with pytest.raises(OSError, match="seccomp filter not loaded"):
        spawner.spawn(["/bin/true"], stdin=0, stdout=1, stderr=2)


def test_an_unsupported_guest_machine_is_refused(monkeypatch):
    monkeypatch.setattr(vsock_guard.os, "uname", lambda: os.uname_result(("Linux", "g", "6.1", "#1", "riscv64")))
    with pytest.raises(OSError, match="no vsock guard for riscv64"):
        vsock_guard.install_on_this_thread()
