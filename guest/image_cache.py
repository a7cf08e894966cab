"""Finding a built guest image in the cache (see guest.build for its layout).

Apart from the builder so that a sandbox, which only needs the current image's files,
imports nothing of the builder's on its start-up path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GuestImage:
    kernel: Path  # what QEMU boots with -kernel
    initrd: Path  # stage 1: it mounts `root`
    root: Path  # the guest's root, an erofs image the guest maps on virtio-pmem
    key: str  # cache key
    manifest: dict = field(repr=False)  # what it was built from: see guest.build

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in (self.kernel, self.initrd, self.root))


def load_image(image_dir: Path) -> GuestImage | None:
    """The image built in `image_dir`, or None if it is incomplete or damaged."""
    try:
        manifest = json.loads((image_dir / "manifest.json").read_text())
        kernel_file = image_dir / manifest["files"]["kernel"]
        initrd_file = image_dir / manifest["files"]["initrd"]
        root_file = image_dir / manifest["files"]["root"]  # an image from before the erofs root has none
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(path.is_file() for path in (kernel_file, initrd_file, root_file)):
        return None
    return GuestImage(kernel_file, initrd_file, root_file, image_dir.name, manifest)


def find_image(cache_dir: Path) -> GuestImage | None:
    """The current built image, or None. Reads only the pointer and the manifest."""
    current = Path(cache_dir) / "current"
    try:
        target = os.readlink(current)
    except OSError:
        return None
    return load_image(Path(cache_dir) / target)
