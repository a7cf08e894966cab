"""The guest's root tree outside Python: layout, /etc, busybox, crun, libraries, /init.

The tree uses the merged-/usr layout (/bin, /sbin, /lib, /lib64 are symlinks into /usr);
files from packages that ship under /lib or /bin are placed under /usr accordingly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from vmrun.errors import ImageError
from vmrun.proc import run

from guest.elf import is_elf, needed_closure

MULTIARCH = "x86_64-linux-gnu"
MERGED = ("bin", "sbin", "lib", "lib64")
MOUNTPOINTS = ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "var/tmp")

ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/hostname": "vmrun\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
}


def guest_to_tree(guest_path: str) -> str:
    """Map a package path (as shipped, e.g. lib/x86_64-linux-gnu/libc.so.6) to merged /usr."""
    rel = guest_path.lstrip("/")
    top, _, rest = rel.partition("/")
    if top in MERGED:
        return f"usr/{top}/{rest}" if rest else f"usr/{top}"
    return rel


def make_layout(root: Path) -> None:
    for top in MERGED:
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        os.symlink(f"usr/{top}", root / top)
    for d in MOUNTPOINTS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    (root / "etc/vmrun").mkdir(parents=True, exist_ok=True)
    for rel, text in ETC_FILES.items():
        (root / rel).write_text(text)


def install_busybox(staging: Path, root: Path) -> int:
    """/usr/bin/busybox plus a symlink per applet; returns the number of applets."""
    src = staging / "bin/busybox"
    if not src.exists():
        raise ImageError("busybox-static did not provide /bin/busybox")
    dest = root / "usr/bin/busybox"
    shutil.copy2(src, dest)
    listing = run([src, "--list-full"], timeout=30).stdout.decode().split()
    count = 0
    for applet in listing:
        rel = guest_to_tree(applet)
        link = root / rel
        if link.exists() or link.is_symlink() or link.name == "busybox":
            continue  # a real program (python3, ...) wins over the applet
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/usr/bin/busybox", link)
        count += 1
    return count


def install_crun(staging: Path, root: Path) -> None:
    src = staging / "usr/bin/crun"
    if not src.exists():
        raise ImageError("the crun package did not provide /usr/bin/crun")
    shutil.copy2(src, root / "usr/bin/crun")


def library_dirs(staging: Path) -> list[Path]:
    """Host directories standing for the guest's default library search path."""
    return [
        staging / "lib" / MULTIARCH,
        staging / "usr/lib" / MULTIARCH,
        staging / "lib",
        staging / "usr/lib",
        staging / "lib64",
    ]


def elf_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.stat().st_size > 64 and is_elf(path):
                if not name.endswith(".ko"):
                    found.append(path)
    return sorted(found)


def install_libraries(staging: Path, root: Path) -> list[str]:
    """Copy the NEEDED closure of every ELF file in root from staging; return sonames.

    Libraries are copied dereferenced under their soname into /usr/lib/<multiarch>; the
    program interpreter also gets its /lib64 path. Unresolvable dependencies are an error.
    """
    closure = needed_closure(
        elf_files(root),
        library_dirs(staging),
        map_path=lambda p: staging / p.lstrip("/"),
    )
    if closure.missing:
        soname, users = sorted(closure.missing.items())[0]
        shown = ", ".join("/" + str(Path(u).relative_to(root)) for u in users[:3])
        raise ImageError(
            f"the guest image lacks library {soname} (needed by {shown}): add the Debian"
            " package that ships it to guest.build.PACKAGES"
        )
    libdir = root / "usr/lib" / MULTIARCH
    libdir.mkdir(parents=True, exist_ok=True)
    for soname, src in sorted(closure.libraries.items()):
        if root in src.parents:
            continue  # found inside the tree itself (RUNPATH $ORIGIN)
        shutil.copy2(src, libdir / soname, follow_symlinks=True)
    interp = root / "usr/lib64/ld-linux-x86-64.so.2"
    if "ld-linux-x86-64.so.2" in closure.libraries and not interp.exists():
        os.symlink(f"../lib/{MULTIARCH}/ld-linux-x86-64.so.2", interp)
    return sorted(closure.libraries)


def install_init(init_script: Path, root: Path) -> None:
    shutil.copyfile(init_script, root / "init")
    (root / "init").chmod(0o755)


def write_guest_files(root: Path, manifest: dict, modules: Iterable[str]) -> None:
    (root / "etc/vmrun/image.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (root / "etc/vmrun/modules.order").write_text("".join(f"{m}\n" for m in modules))


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes of regular files, number of entries)."""
    total = entries = 0
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            entries += 1
            p = Path(dirpath) / name
            if not p.is_symlink() and p.is_file():
                total += p.stat().st_size
    return total, entries
