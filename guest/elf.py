"""A small ELF64 reader: dynamic dependencies, sections, notes; and the NEEDED closure.

Only what the image builder needs: DT_NEEDED / DT_RUNPATH / PT_INTERP of executables and
shared objects (to copy the libraries they load), the `.modinfo` section of kernel modules
(their `depends=`), and ELF notes (the Xen PVH entry note of a vmlinux).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

ELF_MAGIC = b"\x7fELF"

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4
SHT_NOTE = 7

DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29

# Xen ELF note types (xen/include/public/elfnote.h); PHYS32_ENTRY is the PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 0x12


class ElfFormatError(ValueError):
    """The bytes are not a (supported: 64-bit little-endian) ELF file."""


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class Note:
    owner: str
    type: int
    desc: bytes


@dataclass
class ElfInfo:
    """What the dynamic linker will want for one ELF file."""

    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)  # DT_RUNPATH, or DT_RPATH when absent
    soname: str | None = None
    interp: str | None = None


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


class ElfFile:
    """Parsed headers of an in-memory ELF64 little-endian image."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 64 or data[:4] != ELF_MAGIC:
            raise ElfFormatError("not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise ElfFormatError("only 64-bit little-endian ELF is supported")
        self.data = data
        (
            self.e_type,
            _machine,
            _version,
            self.entry,
            phoff,
            shoff,
            _flags,
            _ehsize,
            phentsize,
            phnum,
            shentsize,
            shnum,
            shstrndx,
        ) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        self.segments: list[Segment] = []
        for i in range(phnum):
            off = phoff + i * phentsize
            if off + 56 > len(data):
                raise ElfFormatError("truncated program header table")
            p_type, _pflags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, off
            )
            self.segments.append(Segment(p_type, p_offset, p_vaddr, p_filesz))
        self.sections: list[Section] = []
        raw: list[tuple[int, int, int, int]] = []
        for i in range(shnum):
            off = shoff + i * shentsize
            if off + 64 > len(data):
                raise ElfFormatError("truncated section header table")
            sh_name, sh_type, _shflags, _addr, sh_offset, sh_size = struct.unpack_from(
                "<IIQQQQ", data, off
            )
            raw.append((sh_name, sh_type, sh_offset, sh_size))
        self.headers_end = max(phoff + phnum * phentsize, shoff + shnum * shentsize, 64)
        if raw and shstrndx < len(raw):
            _n, _t, str_off, str_size = raw[shstrndx]
            strtab = data[str_off : str_off + str_size]
            for sh_name, sh_type, sh_offset, sh_size in raw:
                self.sections.append(Section(_cstr(strtab, sh_name), sh_type, sh_offset, sh_size))

    # -- generic accessors ----------------------------------------------------------------

    def section(self, name: str) -> bytes | None:
        for s in self.sections:
            if s.name == name:
                return self.data[s.offset : s.offset + s.size]
        return None

    def _vaddr_to_offset(self, addr: int) -> int | None:
        for seg in self.segments:
            if seg.type == PT_LOAD and seg.vaddr <= addr < seg.vaddr + seg.filesz:
                return addr - seg.vaddr + seg.offset
        return None

    def notes(self) -> Iterator[Note]:
        """Notes from PT_NOTE segments, or from SHT_NOTE sections when there are none."""
        blobs = [
            self.data[s.offset : s.offset + s.filesz] for s in self.segments if s.type == PT_NOTE
        ]
        if not blobs:
            blobs = [
                self.data[s.offset : s.offset + s.size] for s in self.sections if s.type == SHT_NOTE
            ]
        for blob in blobs:
            yield from parse_notes(blob)

    def content_end(self) -> int:
        """End of the last byte the ELF headers describe (anything after is appended data)."""
        end = self.headers_end
        for seg in self.segments:
            end = max(end, seg.offset + seg.filesz)
        for sec in self.sections:
            if sec.type != 8:  # SHT_NOBITS occupies no file space
                end = max(end, sec.offset + sec.size)
        return end

    # -- dynamic linking ------------------------------------------------------------------

    def info(self) -> ElfInfo:
        info = ElfInfo()
        for seg in self.segments:
            if seg.type == PT_INTERP:
                info.interp = _cstr(self.data[seg.offset : seg.offset + seg.filesz], 0) or None
        dyn = next((s for s in self.segments if s.type == PT_DYNAMIC), None)
        if dyn is None:
            return info
        entries: list[tuple[int, int]] = []
        for off in range(dyn.offset, dyn.offset + dyn.filesz - 15, 16):
            tag, val = struct.unpack_from("<qQ", self.data, off)
            if tag == DT_NULL:
                break
            entries.append((tag, val))
        strtab_addr = next((v for t, v in entries if t == DT_STRTAB), None)
        strtab_off = self._vaddr_to_offset(strtab_addr) if strtab_addr is not None else None
        if strtab_off is None:
            return info

        def string(index: int) -> str:
            return _cstr(self.data, strtab_off + index)

        rpath: list[str] = []
        for tag, val in entries:
            if tag == DT_NEEDED:
                info.needed.append(string(val))
            elif tag == DT_SONAME:
                info.soname = string(val)
            elif tag == DT_RUNPATH:
                info.runpath.extend(p for p in string(val).split(":") if p)
            elif tag == DT_RPATH:
                rpath.extend(p for p in string(val).split(":") if p)
        if not info.runpath:
            info.runpath = rpath
        return info


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    if end < 0:
        end = len(data)
    return data[offset:end].decode("utf-8", errors="replace")


def parse_notes(blob: bytes) -> Iterator[Note]:
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name = blob[off : off + namesz].rstrip(b"\0").decode("ascii", errors="replace")
        off += (namesz + 3) & ~3
        desc = blob[off : off + descsz]
        off += (descsz + 3) & ~3
        yield Note(name, ntype, desc)


def read_info(path: Path) -> ElfInfo | None:
    """ElfInfo of a file, or None when it is not a 64-bit little-endian ELF file."""
    try:
        return ElfFile(Path(path).read_bytes()).info()
    except (ElfFormatError, struct.error, OSError):
        return None


def has_pvh_note(data: bytes) -> bool:
    """True when an ELF kernel image carries the Xen PVH entry note (QEMU boots it directly)."""
    try:
        elf = ElfFile(data)
        return any(n.owner == "Xen" and n.type == XEN_ELFNOTE_PHYS32_ENTRY for n in elf.notes())
    except (ElfFormatError, struct.error):
        return False


# -- the NEEDED closure ---------------------------------------------------------------------


@dataclass
class Closure:
    """Libraries to install: soname -> where it was found; and what could not be found."""

    libraries: dict[str, Path] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)  # soname -> users


def _expand_origin(entry: str, origin: Path) -> Path:
    return Path(entry.replace("$ORIGIN", str(origin)).replace("${ORIGIN}", str(origin)))


def needed_closure(
    roots: Iterable[Path],
    search_dirs: Sequence[Path],
    *,
    read: Callable[[Path], ElfInfo | None] = read_info,
    map_path: Callable[[str], Path] | None = None,
) -> Closure:
    """Resolve, transitively, the shared libraries the ELF files `roots` need.

    `search_dirs` are the (host-side) directories standing for the guest's default library
    path. RUNPATH entries are absolute guest paths or $ORIGIN-relative; `map_path` turns an
    absolute guest path into a host path (identity when None). The program interpreter
    (PT_INTERP) is resolved by its file name like a soname.
    """
    closure = Closure()
    queue: list[Path] = list(roots)
    seen: set[Path] = set()
    to_host = map_path or (lambda p: Path(p))
    while queue:
        path = queue.pop(0)
        real = Path(os.path.realpath(path))
        if real in seen:
            continue
        seen.add(real)
        info = read(path)
        if info is None:
            continue
        wanted = list(info.needed)
        if info.interp:
            wanted.append(Path(info.interp).name)
        for soname in wanted:
            if soname in closure.libraries:
                continue
            found = _find_library(soname, info, path, search_dirs, to_host)
            if found is None:
                closure.missing.setdefault(soname, []).append(str(path))
                continue
            closure.libraries[soname] = found
            queue.append(found)
    return closure


def _find_library(
    soname: str,
    info: ElfInfo,
    user: Path,
    search_dirs: Sequence[Path],
    to_host: Callable[[str], Path],
) -> Path | None:
    if "/" in soname:
        candidate = to_host(soname)
        return candidate if candidate.exists() else None
    dirs: list[Path] = []
    for entry in info.runpath:
        if "$ORIGIN" in entry or "${ORIGIN}" in entry:
            dirs.append(_expand_origin(entry, user.parent))
        else:
            dirs.append(to_host(entry))
    dirs.extend(search_dirs)
    for d in dirs:
        candidate = d / soname
        if candidate.exists():
            return candidate
    return None
