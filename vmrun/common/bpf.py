"""Classic BPF for seccomp filters: a small assembler with forward jumps to labels, and
the layout of what a filter reads (struct seccomp_data)."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K

RET_KILL_PROCESS = 0x80000000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000


def ret_errno(number: int) -> int:
    return 0x00050000 | number


# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args (u64[6]).
NR, ARCH = 0, 4


def arg_low(index: int) -> int:
    """Where argument `index`'s low 32 bits are (little-endian)."""
    return 16 + 8 * index


def arg_high(index: int) -> int:
    return 20 + 8 * index


@dataclass
class Program:
    """Instructions appended in order; a jump names a label placed later (`label`)."""

    insns: list[tuple[int, object, object, int]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def load(self, offset: int) -> None:
        self.insns.append((LD_W_ABS, 0, 0, offset))

    def and_(self, mask: int) -> None:
        self.insns.append((ALU_AND_K, 0, 0, mask))

    def jump(self, code: int, k: int, if_true: str | int = 0, if_false: str | int = 0) -> None:
        """To `if_true`/`if_false` (a label, or 0: the next instruction)."""
        self.insns.append((code, if_true, if_false, k))

    def ret(self, value: int) -> None:
        self.insns.append((RET_K, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def assemble(self) -> bytes:
        return b"".join(INSN.pack(code, self._offset(i, jt), self._offset(i, jf), k)
                        for i, (code, jt, jf, k) in enumerate(self.insns))

    def _offset(self, index: int, target: object) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[str(target)] - index - 1
        if not 0 <= offset < 256:
            raise ValueError(f"jump to {target} out of range")
        return offset


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def sock_fprog(program: bytes) -> tuple[SockFprog, ctypes.Array]:
    """struct sock_fprog for `program`, and the buffer it points to (keep both alive)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    return SockFprog(len(program) // INSN.size, ctypes.addressof(buffer)), buffer
