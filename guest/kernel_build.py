"""The vmrun guest kernel: Linux from Debian's linux-source package, configured by
`guest/kernel-config/vmrun.config` merged onto `tinyconfig`, every driver the guest uses
built in (no modules to load at boot), booted by QEMU as a PVH ELF.

Against Debian's cloud kernel, measured under TCG (docs/performance.md): a template's RAM
holds 54 MiB instead of 91 (a smaller kernel image, fewer per-CPU and slab caches), so each
clone copies 37 MiB less; the kernel reaches /init 0.3 s sooner and nothing is loaded
after. Building takes about 6.5 minutes on 2 cores, once: the result is cached under
`<cache_dir>/kernels/<key>/vmlinux`, keyed by the source package's version, the fragment
and KERNEL_BUILDER_VERSION, so rebuilding the image for an agent change reuses it.

The fragment turns the kernel's own speculation mitigations off. The guest is one trust
domain (one pod, whose kernel we already treat as the attacker's); what isolates it from
the host and from other pods is the hypervisor, and the host's mitigations stay on.

What no config option sets is changed in the source (SOURCE_EDITS), each edit checked to
apply exactly once: a new source release that moved its text stops the build.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmrun.errors import ImageError
from vmrun.proc import CommandError, run

from guest.cache_dirs import prune_keeping_newest
from guest.elf import has_pvh_note

SOURCE_PACKAGE = "linux-source-6.1"
CONFIG_FRAGMENT = Path(__file__).resolve().parent / "kernel-config" / "vmrun.config"
KERNEL_BUILDER_VERSION = 1
KEEP_KERNELS = 2
_BUILD_TIMEOUT = 3600.0

Log = Callable[[str], None]

_OPTION = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(\S+)")


@dataclass(frozen=True)
class SourceEdit:
    """`old` replaced by `new` in the file `path` of the kernel's source tree."""

    path: str
    old: str
    new: str


SOURCE_EDITS = (
    # The guest's vsock receive buffers: 16 KiB instead of 4 KiB (less the skb's own
    # overhead). Host-to-guest data comes one packet per buffer, each tens of microseconds
    # of guest kernel work under TCG: 300 MiB into `cat > /dev/null` took 87,000 packets.
    # Measured (docs/performance.md): through `cat` ~15 % faster, as fast as with 64 KiB
    # buffers, which would be order-4 allocations, the first to fail in fragmented guest
    # memory. The cost: ~8 MiB more guest RAM touched in a pod that received bulk data.
    SourceEdit("include/linux/virtio_vsock.h",
               "VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE\tSKB_WITH_OVERHEAD(1024 * 4)",
               "VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE\tSKB_WITH_OVERHEAD(1024 * 16)"),
)


def wanted_options(fragment: str) -> dict[str, str]:
    """The options a fragment sets (`CONFIG_X=y`); comments and blank lines skipped."""
    return {m.group(1): m.group(2) for line in fragment.splitlines() if (m := _OPTION.match(line.strip()))}


def missing_options(wanted: dict[str, str], config: str) -> list[str]:
    """What of `wanted` the final .config does not have: Kconfig silently drops an option
    whose dependencies are not met, and the guest would boot without it."""
    have = {m.group(1): m.group(2) for line in config.splitlines() if (m := _OPTION.match(line))}
    missing = []
    for name, value in sorted(wanted.items()):
        if value == "n":
            if have.get(name, "n") != "n":
                missing.append(f"{name}=n (is {have[name]})")
        elif have.get(name) != value:
            missing.append(f"{name}={value} (is {have.get(name, 'unset')})")
    return missing


def kernel_key(source_version: str, fragment: str, edits: tuple[SourceEdit, ...] = SOURCE_EDITS) -> str:
    blob = f"{KERNEL_BUILDER_VERSION}\0{SOURCE_PACKAGE}\0{source_version}\0{fragment}\0{edits!r}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def apply_source_edits(source: Path, edits: tuple[SourceEdit, ...] = SOURCE_EDITS) -> None:
    """Make each edit in the unpacked tree `source`; ImageError unless `old` is found once."""
    for edit in edits:
        path = source / edit.path
        try:
            text = path.read_text()
        except OSError as exc:
            raise ImageError(f"guest kernel source: cannot read {edit.path}: {exc.strerror}") from None
        found = text.count(edit.old)
        if found != 1:
            raise ImageError(f"guest kernel source: {edit.path} holds {edit.old!r} {found} times, not once: "
                             "see SOURCE_EDITS in guest/kernel_build.py")
        path.write_text(text.replace(edit.old, edit.new))


def cached_kernel(kernels_dir: Path, key: str) -> Path | None:
    vmlinux = kernels_dir / key / "vmlinux"
    return vmlinux if vmlinux.is_file() else None


def build_kernel(source_deb: Path, source_version: str, kernels_dir: Path, log: Log) -> Path:
    """The vmlinux for this source and fragment: from the cache, or built into it."""
    fragment = CONFIG_FRAGMENT.read_text()
    key = kernel_key(source_version, fragment)
    cached = cached_kernel(kernels_dir, key)
    if cached is not None:
        return cached
    kernels_dir.mkdir(parents=True, exist_ok=True)
    for stale in kernels_dir.glob(".build-*"):  # a crashed build's (the image lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=kernels_dir))
    try:
        source = _unpack_source(source_deb, work, log)
        apply_source_edits(source)
        _configure(source, fragment, log)
        jobs = str(os.cpu_count() or 1)
        log(f"kernel: building vmlinux from {SOURCE_PACKAGE} {source_version} ({jobs} jobs; minutes, once)")
        _make(source, ["-j", jobs, "vmlinux"], timeout=_BUILD_TIMEOUT)
        vmlinux = source / "vmlinux"
        with open(vmlinux, "rb") as f:
            if not has_pvh_note(f.read()):
                raise ImageError("the built kernel has no PVH entry point (CONFIG_PVH)")
        out = work / "out"
        out.mkdir()
        shutil.copyfile(vmlinux, out / "vmlinux")
        (out / "config").write_text((source / ".config").read_text())
        out.rename(kernels_dir / key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(kernels_dir, key)
    return kernels_dir / key / "vmlinux"


def _unpack_source(source_deb: Path, work: Path, log: Log) -> Path:
    log(f"kernel: unpacking {SOURCE_PACKAGE}")
    staging = work / "deb"
    _run(["dpkg-deb", "-x", source_deb, staging], timeout=600)
    tarballs = sorted((staging / "usr/src").glob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise ImageError(f"{source_deb.name} holds no single linux-source tarball: {[t.name for t in tarballs]}")
    _run(["tar", "-xf", tarballs[0], "-C", work], timeout=900)
    shutil.rmtree(staging)
    trees = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source-")]
    if len(trees) != 1:
        raise ImageError(f"the {SOURCE_PACKAGE} tarball unpacked to {[t.name for t in trees]}")
    return trees[0]


def _configure(source: Path, fragment: str, log: Log) -> None:
    log("kernel: tinyconfig + guest/kernel-config/vmrun.config")
    _make(source, ["tinyconfig"], timeout=300)
    (source / "vmrun.config").write_text(fragment)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", "vmrun.config"], timeout=300, cwd=source)
    _make(source, ["olddefconfig"], timeout=300)
    missing = missing_options(wanted_options(fragment), (source / ".config").read_text())
    if missing:
        raise ImageError("the guest kernel's config lost options whose dependencies are not met: "
                         + ", ".join(missing))


def _make(source: Path, targets: list[str], timeout: float) -> None:
    _run(["make", "ARCH=x86_64", *targets], timeout=timeout, cwd=source)


def _run(argv: list, timeout: float, cwd: Path | None = None) -> None:
    try:
        run(argv, timeout=timeout, cwd=cwd)
    except CommandError as exc:  # its message ends with the command's last line of output
        raise ImageError(f"guest kernel build: {exc}") from None


def _prune(kernels_dir: Path, keep_key: str) -> None:
    built = [p for p in kernels_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    prune_keeping_newest(built, keep_key, KEEP_KERNELS)
