"""The guest's root as a read-only erofs image, and the small stage-1 initrd that mounts it.

The host maps the image into every guest on virtio-pmem (vmrun/hypervisor/qemu.py) and the
guest mounts it with DAX: its pages live once in the host's page cache, shared by all guests,
templates and clones, and are never copied into guest RAM (../shared notes: density.md).
erofs for DAX wants 4 KiB blocks (erofs-utils 1.5 has no other), no inline file tails
(a file with one is never DAX), no compression, and an image size in whole 2 MiB (else the
guest's nd_pmem refuses the namespace as misaligned).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from guest import cpio, kernel
from vmrun.errors import CommandError, ImageError
from vmrun.proc import run

STAGE1_INIT = Path(__file__).resolve().parent / "initrd" / "stage1"
# What stage 1 loads (with their dependencies); the root's /init then skips them.
STAGE1_MODULES = ("virtio_pci", "virtio_pmem", "nd_pmem", "erofs")
_ALIGN = 2 << 20


def make_erofs(tree: Path, dest: Path) -> int:
    """The image of `tree`, owned by root, padded to whole 2 MiB; its size."""
    if shutil.which("mkfs.erofs") is None:
        raise ImageError("mkfs.erofs not found: install erofs-utils (scripts/setup.sh does)")
    try:
        run(["mkfs.erofs", "-T0", "--all-root", "-E", "noinline_data", dest, tree], timeout=600)
    except CommandError as exc:
        raise ImageError(f"cannot make the root image: {exc}") from None
    size = dest.stat().st_size
    padded = -(-size // _ALIGN) * _ALIGN
    os.truncate(dest, padded)
    return padded


def make_stage1(busybox: Path, tree: kernel.ModuleTree | None, order: list[str], workdir: Path,
                dest: Path) -> tuple[int, int]:
    """The stage-1 initrd: busybox, the modules of `order` (loaded in that order), its
    /init; packed as the full initrd was (cpio newc + lz4). Its (cpio size, entries)."""
    root = workdir / "stage1"
    for directory in ("bin", "dev", "proc", "newroot", "etc", "lib/modules"):
        (root / directory).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "mount", "umount", "insmod", "usleep", "switch_root", "poweroff"):
        os.symlink("busybox", root / "bin" / applet)
    names = []
    for name in order:  # none with the vmrun kernel: its drivers are built in
        assert tree is not None
        file_name = f"{name}.ko"
        (root / "lib/modules" / file_name).write_bytes(kernel.read_module(tree.paths[name]))
        names.append(file_name)
    (root / "etc" / "modules").write_text("".join(f"{n}\n" for n in names))
    shutil.copy2(STAGE1_INIT, root / "init")
    os.chmod(root / "init", 0o755)
    return cpio.pack(root, workdir, dest, nodes=[cpio.Node("dev/console", 0o20600, 5, 1)])
