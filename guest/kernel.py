"""The guest kernel: the Debian cloud kernel's bzImage, its PVH `vmlinux`, and its modules.

* `extract_vmlinux` unpacks the ELF kernel from a bzImage (the payload is found through the
  boot protocol header, decompressed according to its magic). When that ELF carries the Xen
  PVH entry note QEMU can boot it directly, skipping the in-guest decompression.
* Module handling resolves the load order of the wanted modules from `modules.dep` (or,
  when the package ships none -- Debian's does not, depmod runs in postinst -- from each
  module's `.modinfo` `depends=`), skipping modules built into the kernel.
"""

from __future__ import annotations

import gzip
import lzma
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from vmrun.errors import ImageError
from vmrun.proc import CommandError, run

from guest.debs import Package
from guest.elf import ElfFile, ElfFormatError, has_pvh_note

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# -- bzImage -> vmlinux ---------------------------------------------------------------------


def bzimage_payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage, per the x86 boot protocol (>= 2.08)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    setup_sects = image[0x1F1] or 4
    start = (setup_sects + 1) * 512
    if version >= 0x208:
        offset, length = struct.unpack_from("<II", image, 0x248)
        payload = image[start + offset : start + offset + length]
        if payload:
            return payload
    # Old header: search for a known compressor magic after the setup code.
    for magic in (LZ4_LEGACY_MAGIC, ZSTD_MAGIC, XZ_MAGIC, GZIP_MAGIC):
        pos = image.find(magic, start)
        if pos >= 0:
            return image[pos:]
    raise ValueError("no compressed payload found in bzImage")


def decompress_payload(payload: bytes) -> bytes:
    """Decompress a kernel payload. The kernel build appends the 4-byte decompressed size."""
    if payload.startswith(LZ4_LEGACY_MAGIC):
        body = payload[:-4]  # lz4 rejects the trailing size word
        return run(["lz4", "-d", "-c"], input=body, timeout=120).stdout
    if payload.startswith(GZIP_MAGIC):
        # Decompress the first gzip member only: the size word follows it.
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(XZ_MAGIC):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(ZSTD_MAGIC):
        return run(["zstd", "-d", "-c"], input=payload[:-4], timeout=120).stdout
    raise ValueError(f"unknown kernel compression (magic {payload[:4].hex()})")


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage if it has a PVH entry note, else None.

    Any problem (unknown compression, missing tool, not ELF, no PVH note) yields None: the
    caller then boots the bzImage. Data appended after the ELF (relocations) is cut off.
    """
    try:
        raw = decompress_payload(bzimage_payload(bzimage))
        elf = ElfFile(raw)
    except (ValueError, ElfFormatError, CommandError, lzma.LZMAError, OSError, struct.error):
        return None
    if not has_pvh_note(raw):
        return None
    return raw[: elf.content_end()]


# -- modules ----------------------------------------------------------------------------------


def module_name(path: str | Path) -> str:
    """Canonical module name of a module file: basename without suffix, '-' -> '_'."""
    base = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep ("path: dep-path dep-path"): {name: (path, [dep names])}."""
    result: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        result[module_name(path)] = (path, [module_name(d) for d in deps.split()])
    return result


def parse_builtin(text: str) -> set[str]:
    """Module names listed in modules.builtin (paths like kernel/fs/fuse/fuse.ko)."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def parse_module_list(text: str) -> list[tuple[str, bool]]:
    """Parse modules.txt: one module per line, '#' comments, a trailing '?' = optional."""
    wanted: list[tuple[str, bool]] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        optional = line.endswith("?")
        wanted.append((line.rstrip("?").strip().replace("-", "_"), optional))
    return wanted


class UnknownModule(LookupError):
    pass


def load_order(
    wanted: Iterable[str],
    depends: Callable[[str], list[str]],
    builtin: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Modules to load, dependencies first, each once; builtin modules are skipped.

    `depends(name)` returns a module's direct dependencies and raises UnknownModule for a
    module that does not exist (as a loadable module).
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done or name in builtin:
            return
        if name in visiting:
            raise ImageError(f"kernel module dependency cycle involving {name}")
        visiting.add(name)
        for dep in depends(name):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value pairs of a module's .modinfo section."""
    section = ElfFile(data).section(".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode("utf-8", errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def read_module(path: Path) -> bytes:
    """A module file's bytes, decompressed, without its signature (strip_signature)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        data = lzma.decompress(data)
    elif name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".zst"):
        data = run(["zstd", "-d", "-c"], input=data, timeout=60).stdout
    return strip_signature(data)


_SIGNATURE_MAGIC = b"~Module signature appended~\n"
_SIGNATURE_INFO = struct.Struct(">BBBBB3xI")  # algo, hash, id type, signer len, key id len, sig len


def strip_signature(module: bytes) -> bytes:
    """The module without the signature appended to it. The guest kernel then skips the
    RSA check of each module it loads (milliseconds each under TCG) and marks itself
    tainted ('E'): the guest's code is its tenant's to change anyway, and the host trusts
    nothing the guest says. A module without a signature is returned as it is."""
    if not module.endswith(_SIGNATURE_MAGIC):
        return module
    info_end = len(module) - len(_SIGNATURE_MAGIC)
    info_start = info_end - _SIGNATURE_INFO.size
    if info_start < 0:
        raise ValueError("a module signature's trailer without its information")
    *_, signer_len, key_id_len, sig_len = _SIGNATURE_INFO.unpack_from(module, info_start)
    data_end = info_start - sig_len - signer_len - key_id_len
    if data_end <= 0:
        raise ValueError("a module signature longer than its module")
    return module[:data_end]


@dataclass
class ModuleTree:
    """The modules of one kernel release in an extracted package tree."""

    root: Path  # .../lib/modules/<release>
    paths: dict[str, Path] = field(default_factory=dict)  # name -> file
    dep_table: dict[str, list[str]] | None = None  # from modules.dep when shipped
    builtin: set[str] = field(default_factory=set)
    _modinfo_deps: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> "ModuleTree":
        tree = cls(root)
        for path in sorted(root.rglob("*.ko*")):
            if path.name.endswith(MODULE_SUFFIXES):
                tree.paths.setdefault(module_name(path), path)
        dep_file = root / "modules.dep"
        if dep_file.exists():
            table = parse_modules_dep(dep_file.read_text())
            tree.dep_table = {name: deps for name, (_p, deps) in table.items()}
        builtin_file = root / "modules.builtin"
        if builtin_file.exists():
            tree.builtin = parse_builtin(builtin_file.read_text())
        return tree

    def depends(self, name: str) -> list[str]:
        if name not in self.paths:
            raise UnknownModule(name)
        if self.dep_table is not None and name in self.dep_table:
            return self.dep_table[name]
        if name not in self._modinfo_deps:
            info = modinfo(read_module(self.paths[name]))
            deps = ",".join(info.get("depends", [])).split(",")
            self._modinfo_deps[name] = [d.strip().replace("-", "_") for d in deps if d.strip()]
        return self._modinfo_deps[name]

    def resolve(self, wanted: list[tuple[str, bool]], log: Callable[[str], None]) -> list[str]:
        names: list[str] = []
        for name, optional in wanted:
            if name in self.builtin:
                continue
            if name not in self.paths:
                if optional:
                    log(f"kernel module {name} not available; skipped (optional)")
                    continue
                raise ImageError(
                    f"kernel module {name} is neither built in nor shipped by {self.root.name}"
                )
            names.append(name)
        try:
            return load_order(names, self.depends, self.builtin)
        except UnknownModule as exc:
            raise ImageError(f"kernel module dependency {exc.args[0]} not found") from None


def install_modules(tree: ModuleTree, order: list[str], root: Path, release: str) -> list[str]:
    """Copy (decompressed) modules into the guest tree; return their guest paths in order."""
    guest_paths: list[str] = []
    for name in order:
        src = tree.paths[name]
        rel = src.relative_to(tree.root).as_posix()
        for suffix in (".xz", ".zst", ".gz"):
            if rel.endswith(suffix):
                rel = rel[: -len(suffix)]
        guest = f"/usr/lib/modules/{release}/{rel}"
        dest = root / guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_module(src))
        guest_paths.append(guest)
    return guest_paths


# -- the kernel package -------------------------------------------------------------------------


@dataclass
class Kernel:
    release: str
    bzimage: Path  # the vmlinux itself for the kernel vmrun builds (guest/kernel_build.py)
    vmlinux: bytes | None  # PVH-capable ELF, or None


def find_release(staging: Path) -> str:
    modules = staging / "lib" / "modules"
    releases = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(releases) != 1:
        raise ImageError(f"expected one kernel release in the kernel package, found {releases}")
    return releases[0]


def kernel_from_staging(staging: Path) -> Kernel:
    release = find_release(staging)
    bzimage = staging / "boot" / f"vmlinuz-{release}"
    if not bzimage.exists():
        raise ImageError(f"the kernel package has no /boot/vmlinuz-{release}")
    return Kernel(release, bzimage, extract_vmlinux(bzimage.read_bytes()))


def kernel_package(meta: Package) -> str:
    """Name of the versioned kernel package (linux-image-6.1.0-N-cloud-amd64) a meta
    package (linux-image-cloud-amd64) depends on."""
    for dep in meta.depends:
        if re.fullmatch(r"linux-image-\d[\w.+~-]*", dep):
            return dep
    raise ImageError(
        f"cannot download Debian package {meta.name}: it depends on no kernel image package"
        f" ({', '.join(meta.depends) or 'no dependencies'})"
    )
