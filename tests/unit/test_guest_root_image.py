"""The guest's root as an erofs image for DAX, and the stage-1 initrd that mounts it."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from guest import kernel, root_image

pytestmark = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")


def test_the_image_is_whole_2_mib_and_holds_the_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"x" * 5000)
    (tree / "etc").mkdir()
    (tree / "etc/hostname").write_text("vmrun\n")
    size = root_image.make_erofs(tree, tmp_path / "root.erofs")
    assert size == (tmp_path / "root.erofs").stat().st_size and size % (2 << 20) == 0
    listing = subprocess.run(["dump.erofs", "--ls", "--path=/usr/bin", str(tmp_path / "root.erofs")],
                             capture_output=True, text=True)
    if listing.returncode == 0:  # dump.erofs (erofs-utils) reads it back
        assert "tool" in listing.stdout


def test_stage1_loads_its_modules_in_order_then_switches_root(tmp_path):
    modules = tmp_path / "lib/modules/6.1.0"
    (modules / "kernel").mkdir(parents=True)
    for name in ("virtio", "erofs"):
        (modules / "kernel" / f"{name}.ko").write_bytes(f"module {name}".encode())
    tree = kernel.ModuleTree.load(modules)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static not installed")
    cpio_bytes, entries = root_image.make_stage1(busybox, tree, ["virtio", "erofs"], tmp_path / "work",
                                                 tmp_path / "initrd.img")
    assert cpio_bytes > 0 and entries >= 10
    staged = tmp_path / "work" / "stage1"
    assert (staged / "etc/modules").read_text() == "virtio.ko\nerofs.ko\n"
    assert (staged / "lib/modules/erofs.ko").read_bytes() == b"module erofs"
    init = (staged / "init").read_text()
    assert "mount -t erofs -o ro,dax=always /dev/pmem0 /newroot" in init
    assert "exec switch_root /newroot /init --rerooted" in init
    assert (tmp_path / "initrd.img").stat().st_size > 0
