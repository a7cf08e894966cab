"""The guest kernel and initrd a sandbox or a template boots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmrun.config import Config
from vmrun.errors import ImageError


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path


def boot_files(config: Config) -> BootFiles:
    """The guest kernel and initrd: configured explicitly, or the built image."""
    if config.kernel or config.initrd:
        files = BootFiles(Path(config.kernel), Path(config.initrd))
    else:
        from guest.image_cache import find_image

        image = find_image(config.image_dir)
        if image is None:
            raise ImageError(f"no guest image in {config.image_dir}: run `vmrun image build` first")
        files = BootFiles(image.kernel, image.initrd)
    for path in (files.kernel, files.initrd):
        if not path.is_file():
            raise ImageError(f"guest image file {path} is missing: run `vmrun image build`")
    return files
