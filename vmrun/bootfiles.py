"""The guest kernel, initrd and root image a sandbox or a template boots."""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmrun.config import Config
from vmrun.errors import ImageError


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    # The guest's root, an erofs image mapped on virtio-pmem (a built image's); None with a
    # configured kernel and initrd, whose initrd holds the whole guest.
    root: Path | None = None


def boot_files(config: Config) -> BootFiles:
    """The guest kernel and initrd: configured explicitly, or the built image."""
    if config.kernel or config.initrd:
        files = BootFiles(Path(config.kernel), Path(config.initrd))
    else:
        from guest.image_cache import find_image

        image = find_image(config.image_dir)
        if image is None:
            raise ImageError(f"no guest image in {config.image_dir}: run `vmrun image build` first")
        files = BootFiles(image.kernel, image.initrd, image.root)
    for path in (files.kernel, files.initrd, *([files.root] if files.root else [])):
        if not path.is_file():
            raise ImageError(f"guest image file {path} is missing: run `vmrun image build`")
    return files


_BANNER = re.compile(rb"Linux version (\S+)")


def kernel_release(path: Path) -> str | None:
    """The release (`uname -r`) of the kernel image at `path`, or None if it says none.

    A bzImage names it in its setup header (kernel_version, boot protocol 2.00+); an
    uncompressed vmlinux (what the built image boots, PVH) carries linux_banner as is."""
    try:
        with open(path, "rb") as f:
            header = f.read(0x210)
            if len(header) >= 0x210 and header[0x202:0x206] == b"HdrS":
                offset = int.from_bytes(header[0x20E:0x210], "little")
                if offset:
                    f.seek(offset + 0x200)
                    release = f.read(256).split(b"\0", 1)[0].split(b" ", 1)[0]
                    return release.decode(errors="replace") or None
                return None
            if os.fstat(f.fileno()).st_size == 0:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                match = _BANNER.search(data)  # type: ignore[call-overload]
                return match.group(1).decode(errors="replace") if match else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class GuestVersions:
    """What `vmrun env` says of the guest: each a version, or None with why."""

    kernel: str | None
    kernel_detail: str
    image: str | None
    image_detail: str


def guest_versions(config: Config) -> GuestVersions:
    """The guest kernel's release and the image's id, as configured; never raises."""
    if config.kernel or config.initrd:
        kernel = Path(config.kernel)
        if not kernel.is_file():
            release, detail = None, f"{kernel} is missing"
        else:
            release = kernel_release(kernel)
            detail = str(kernel) if release else f"{kernel} names no version"
        return GuestVersions(release, detail, None, f"none: kernel and initrd ({config.initrd}) are configured")
    from guest.image_cache import find_image

    image = find_image(config.image_dir)
    if image is None:
        missing = f"no guest image in {config.image_dir}: run `vmrun image build`"
        return GuestVersions(None, missing, None, missing)
    kernel_info = image.manifest.get("kernel") or {}
    release = kernel_info.get("release") or kernel_release(image.kernel)
    package = " ".join(str(kernel_info[k]) for k in ("package", "version") if kernel_info.get(k))
    return GuestVersions(release, f"{package + ', ' if package else ''}{image.kernel}", image.key,
                         f"built {image.manifest.get('built_at', '?')} in {image.kernel.parent}")
