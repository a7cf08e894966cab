"""The initramfs archive: cpio "newc" written in Python, compressed with `lz4 -l`.

Writing newc ourselves makes the archive reproducible (sorted, owner root, fixed mtime)
and lets it carry device nodes (/dev/console) without mknod. The kernel's LZ4 initramfs
decompressor needs the legacy LZ4 frame format (`lz4 -l`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from vmrun.errors import ImageError
from vmrun.proc import CommandError, run

TRAILER = "TRAILER!!!"
MTIME = 0


@dataclass(frozen=True)
class Node:
    """A special file to add to the archive (mode includes the file type bits)."""

    path: str  # relative, e.g. "dev/console"
    mode: int
    major: int = 0
    minor: int = 0


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(name: str, *, ino: int, mode: int, nlink: int, size: int, rmaj: int = 0, rmin: int = 0) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rmaj, rmin, len(encoded), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    return head + encoded + _pad(len(head) + len(encoded))


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) for everything under root, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        rel = here.relative_to(root).as_posix()
        if rel != ".":
            yield rel, here
        for name in sorted(filenames + [d for d in dirnames if (here / d).is_symlink()]):
            path = here / name
            yield (path.relative_to(root).as_posix(), path)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]


def write_newc(root: Path, out: BinaryIO, nodes: Iterable[Node] = ()) -> int:
    """Write root (and extra nodes) as a newc archive; return the number of entries."""
    ino = 1
    count = 0
    written: set[str] = set()
    for name, path in walk(root):
        written.add(name)
        st = path.lstat()
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            out.write(_header(name, ino=ino, mode=mode, nlink=2, size=0))
        elif stat.S_ISLNK(mode):
            target = os.readlink(path).encode()
            out.write(_header(name, ino=ino, mode=mode, nlink=1, size=len(target)))
            out.write(target + _pad(len(target)))
        elif stat.S_ISREG(mode):
            out.write(_header(name, ino=ino, mode=mode, nlink=1, size=st.st_size))
            with open(path, "rb") as f:
                size = 0
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
            if size != st.st_size:
                raise ImageError(f"{path} changed while it was being archived")
            out.write(_pad(size))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            rmaj, rmin = os.major(st.st_rdev), os.minor(st.st_rdev)
            out.write(_header(name, ino=ino, mode=mode, nlink=1, size=0, rmaj=rmaj, rmin=rmin))
        else:
            raise ImageError(f"cannot archive {path}: unsupported file type")
        ino += 1
        count += 1
    for node in nodes:
        parents = [p.as_posix() for p in reversed(Path(node.path).parents) if p.as_posix() != "."]
        for parent in parents:
            if parent not in written:
                out.write(_header(parent, ino=ino, mode=stat.S_IFDIR | 0o755, nlink=2, size=0))
                written.add(parent)
                ino += 1
                count += 1
        if node.path in written:
            continue  # the tree has it already
        written.add(node.path)
        out.write(
            _header(node.path, ino=ino, mode=node.mode, nlink=1, size=0, rmaj=node.major, rmin=node.minor)
        )
        ino += 1
        count += 1
    out.write(_header(TRAILER, ino=0, mode=0, nlink=1, size=0))
    # Pad the archive to a 512-byte multiple like cpio(1) does.
    pos = out.tell()
    out.write(b"\0" * ((512 - pos % 512) % 512))
    return count


def lz4_legacy(src: Path, dest: Path, level: int = 9) -> None:
    try:
        run(["lz4", "-l", f"-{level}", "-f", "-q", src, dest], timeout=600)
    except CommandError as exc:
        raise ImageError(f"cannot compress the initramfs with lz4: {exc}") from None


def pack(root: Path, workdir: Path, dest: Path, nodes: Iterable[Node] = ()) -> tuple[int, int]:
    """Archive root into dest (lz4 legacy); return (uncompressed size, entries)."""
    archive = workdir / "initrd.cpio"
    with open(archive, "wb") as f:
        entries = write_newc(root, f, nodes)
        size = f.tell()
    lz4_legacy(archive, dest)
    archive.unlink()
    return size, entries
