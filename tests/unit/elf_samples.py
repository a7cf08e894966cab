"""Synthetic ELF files for the guest builder's tests."""

import struct


def make_elf(notes=(), trailing=b"") -> bytes:
    """A minimal ELF64 LE executable: one PT_LOAD over the headers and one PT_NOTE."""
    blob = b""
    for owner, ntype, desc in notes:
        name = owner.encode() + b"\0"
        blob += struct.pack("<III", len(name), len(desc), ntype)
        blob += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    phoff, phnum = 64, 2
    note_off = phoff + phnum * 56
    end = note_off + len(blob)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x1000000, 0x1000000, end, end, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(blob), len(blob), 4)
    return ehdr + load + note + blob + trailing
