"""Build (or find) the guest image: a kernel, the guest's root as a read-only erofs image
(root.erofs, mapped into each guest on virtio-pmem with DAX: guest/root_image.py), and a
small lz4 initramfs (stage 1) that mounts it.

Cache layout under `cache_dir` (default /var/lib/vmrun/image):

    debs/              downloaded .deb files, reused while their version is current
    wheels/            downloaded wheels
    apt/pkgcache.bin   APT's binary cache, so that computing the key stays cheap
    kernels/<key>/     the vmrun guest kernel built from source (guest/kernel_build.py), reused
                       by every image while its source and config are the same
    <key>/             one built image: vmlinux or vmlinuz, initrd.img, root.erofs, manifest.json
    current            symlink to the newest <key>
    .lock              serialises builds

The key hashes every input: the Debian candidate versions of the packages, the wheel
versions, the files of this `guest` package, the agent sources and BUILDER_VERSION. A rebuild
with nothing changed is a cache hit that downloads and builds nothing. A build happens in
a temporary directory inside cache_dir that is renamed into place at the end, so a failure
leaves no half-built image behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from guest import debs, kernel, kernel_build, python_tree, root_image, rootfs
from guest.cache_dirs import prune_keeping_newest
from guest.image_cache import GuestImage, find_image, load_image  # noqa: F401 - find_image: public here too
from vmrun.bootfiles import kernel_release
from vmrun.errors import ImageError

BUILDER_VERSION = 2  # 2: the root on erofs + a stage-1 initrd
GUEST_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = GUEST_DIR / "initrd" / "init"
MODULES_LIST = GUEST_DIR / "kernel-config" / "modules.txt"

KERNEL_META = "linux-image-cloud-amd64"
# Debian packages of the guest, besides the kernel. Libraries are installed only as far as
# the ELF NEEDED closure of the programs and extension modules in the image requires.
PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libbz2-1.0",
    "libcrypt1",
    "libffi8",
    "liblzma5",
    "libuuid1",
    "libgcc-s1",
    "libstdc++6",
    "crun",
    "libseccomp2",
    "libyajl2",
    "libcap2",
    "libsystemd0",
    "libgcrypt20",
    "libgpg-error0",
    "liblz4-1",
    "libzstd1",
)

# Which kernel file QEMU boots: the PVH ELF when available (QEMU loads it directly, no
# in-guest decompression), else the bzImage.
PREFER_PVH = True

KEY_RE = re.compile(r"[0-9a-f]{16}")
KEEP_IMAGES = 2

Log = Callable[[str], None]


# -- the cache key ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInputs:
    packages: Mapping[str, str]  # Debian package -> candidate version (kernel included)
    wheels: Mapping[str, str]  # distribution -> version
    guest_files: str  # digest of this package's files
    agent: str  # digest of the agent sources
    builder_version: int = BUILDER_VERSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "builder_version": self.builder_version,
            "packages": dict(sorted(self.packages.items())),
            "wheels": dict(sorted(self.wheels.items())),
            "guest_files": self.guest_files,
            "agent": self.agent,
        }


def compute_key(inputs: KeyInputs) -> str:
    blob = json.dumps(inputs.as_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tree_digest(root: Path) -> str:
    """Digest of the files under root (names and contents), ignoring bytecode caches."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel.split("/") or rel.endswith((".pyc", ".pyo")):
            continue
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class Plan:
    """Everything the key is made of, as resolved for this build."""

    inputs: KeyInputs
    key: str
    packages: dict[str, debs.Package]
    kernel_package: str  # Debian's kernel image package, or the linux-source one we build
    agent: python_tree.AgentSources

    @property
    def builds_kernel(self) -> bool:
        return self.kernel_package == kernel_build.SOURCE_PACKAGE


def _kernel_package_name(apt_dir: Path, versions: Mapping[str, str]) -> str:
    """The versioned kernel package the meta package's candidate depends on.

    Reading dependencies costs ~0.2 s (`apt-cache show`), versions ~0.01 s (`policy`), so
    the answer is remembered per meta package version in apt/kernel.json.
    """
    record_file = apt_dir / "kernel.json"
    meta_version = versions[KERNEL_META]
    try:
        record = json.loads(record_file.read_text())
        if record["meta_version"] == meta_version:
            return str(record["package"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    meta = debs.candidates([KERNEL_META], apt_dir)[KERNEL_META]
    name = kernel.kernel_package(meta)
    tmp = record_file.with_name(f".kernel-{os.getpid()}.json")
    tmp.write_text(json.dumps({"meta_version": meta.version, "package": name}) + "\n")
    os.replace(tmp, record_file)
    return name


def make_plan(cache_dir: Path, log: Log, kernel_source: str = "vmrun") -> Plan:
    """The plan for an image whose kernel is "vmrun" (built from source) or "debian"."""
    debs.ensure_lists(log)
    apt_dir = cache_dir / "apt"
    if kernel_source == "vmrun":
        kernel_pkg = kernel_build.SOURCE_PACKAGE
        versions = debs.policy_versions([kernel_pkg, *PACKAGES], apt_dir)
    else:
        versions = debs.policy_versions([KERNEL_META, *PACKAGES], apt_dir)
        kernel_pkg = _kernel_package_name(apt_dir, versions)
        versions.update(debs.policy_versions([kernel_pkg], apt_dir))
        del versions[KERNEL_META]
    packages = {name: debs.Package(name, versions[name]) for name in [kernel_pkg, *PACKAGES]}
    wheels = python_tree.host_versions()
    agent = python_tree.agent_sources()
    inputs = KeyInputs(
        packages={name: p.version for name, p in packages.items()},
        wheels=wheels,
        guest_files=tree_digest(GUEST_DIR),
        agent=agent.digest(),
    )
    return Plan(inputs, compute_key(inputs), packages, kernel_pkg, agent)


# -- the cache -----------------------------------------------------------------------------------


def _point_current(cache_dir: Path, key: str) -> None:
    current = cache_dir / "current"
    try:
        if os.readlink(current) == key:
            return
    except OSError:
        pass
    tmp = cache_dir / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(key, tmp)
    os.replace(tmp, current)


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean_stale(cache_dir: Path) -> None:
    """Remove what a crashed build left (we hold the lock, so no build is running)."""
    for pattern in (".build-*", "debs/.dl-*", "wheels/.dl-*", ".old-*"):
        for path in cache_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _prune_images(cache_dir: Path, keep_key: str) -> None:
    images = [p for p in cache_dir.iterdir() if p.is_dir() and KEY_RE.fullmatch(p.name)]
    prune_keeping_newest(images, keep_key, KEEP_IMAGES)


# -- the build ---------------------------------------------------------------------------------


def build_image(
    cache_dir: Path, *, force: bool = False, log: Log = print, kernel_source: str = "vmrun"
) -> tuple[GuestImage, bool, float]:
    """Build the guest image unless the cache has it; return (image, cache_hit, seconds).
    `kernel_source`: "vmrun" (guest/kernel_build.py) or "debian" (the cloud kernel)."""
    start = time.monotonic()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cache_dir, log, kernel_source)
    if not force:
        cached = load_image(cache_dir / plan.key)
        if cached is not None:
            _point_current(cache_dir, plan.key)
            seconds = time.monotonic() - start
            log(f"guest image {plan.key} is up to date ({_mib(cached.size_bytes)}; {seconds:.2f}s)")
            return cached, True, seconds
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (it runs chroot)")
    with _locked(cache_dir):
        if not force:  # another build may have finished while we waited for the lock
            cached = load_image(cache_dir / plan.key)
            if cached is not None:
                _point_current(cache_dir, plan.key)
                return cached, True, time.monotonic() - start
        _clean_stale(cache_dir)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            out = _build(plan, cache_dir, work, log, start)
            final = cache_dir / plan.key
            if final.exists():  # force: replace the old build of the same key
                old = cache_dir / f".old-{plan.key}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            out.rename(final)
            _point_current(cache_dir, plan.key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune_images(cache_dir, plan.key)
    image = load_image(cache_dir / plan.key)
    if image is None:
        raise ImageError(f"the image built in {cache_dir / plan.key} cannot be read back")
    seconds = time.monotonic() - start
    log(
        f"guest image {plan.key}: kernel {_mib(image.kernel.stat().st_size)}"
        f" ({image.manifest['kernel']['boot']}), root image {_mib(image.manifest['sizes']['root'])}"
        f" (tree {_mib(image.manifest['sizes']['tree_bytes'])}), stage-1 initrd {_mib(image.initrd.stat().st_size)},"
        f" total {_mib(image.size_bytes)}; built in {seconds:.1f}s"
    )
    return image, False, seconds


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _build(plan: Plan, cache_dir: Path, work: Path, log: Log, start: float) -> Path:
    def step(message: str) -> None:
        log(f"[{time.monotonic() - start:5.1f}s] {message}")

    step(f"building guest image {plan.key}")
    all_packages = [plan.packages[plan.kernel_package]] + [plan.packages[n] for n in PACKAGES]
    deb_paths = debs.download(all_packages, cache_dir / "debs", log)
    wheel_paths = python_tree.download_wheels(
        dict(plan.inputs.wheels), cache_dir / "wheels", log
    )

    staging = work / "staging"
    # The kernel's source package is unpacked by its own build, when not cached.
    to_extract = {name: path for name, path in deb_paths.items()
                  if not (plan.builds_kernel and name == plan.kernel_package)}
    step(f"extracting {len(to_extract)} Debian packages")
    debs.extract(to_extract, staging)

    root = work / "root"
    root.mkdir()
    rootfs.make_layout(root)

    tree: kernel.ModuleTree | None = None
    if plan.builds_kernel:
        step("kernel: the vmrun guest kernel (built from source once, then cached)")
        source_deb = deb_paths[plan.kernel_package]
        vmlinux = kernel_build.build_kernel(source_deb, plan.packages[plan.kernel_package].version,
                                            cache_dir / "kernels", log)
        kern = kernel.Kernel(kernel_release(vmlinux) or "unknown", vmlinux, vmlinux.read_bytes())
        stage1_order, module_paths = [], []  # everything is built in
    else:
        step("kernel: unpacking the PVH vmlinux and resolving modules")
        kern = kernel.kernel_from_staging(staging)
        tree = kernel.ModuleTree.load(staging / "lib/modules" / kern.release)
        stage1_order = tree.resolve([(name, False) for name in root_image.STAGE1_MODULES], log)
        order = [name for name in tree.resolve(kernel.parse_module_list(MODULES_LIST.read_text()), log)
                 if name not in stage1_order]  # loaded by stage 1 already
        module_paths = kernel.install_modules(tree, order, root, kern.release)

    step("python: interpreter, trimmed stdlib, wheels, agent")
    python_tree.install_python(staging, root)
    for whl in wheel_paths.values():
        python_tree.install_wheel(whl, root)
    python_tree.install_agent(plan.agent, root)

    applets = rootfs.install_busybox(staging, root)
    rootfs.install_crun(staging, root)
    step("libraries: ELF NEEDED closure")
    libraries = rootfs.install_libraries(staging, root)

    step("precompiling Python bytecode in the guest tree")
    python_tree.compile_tree(
        root,
        sourceless=[python_tree.STDLIB, python_tree.DIST_PACKAGES],
        with_sources=[f"{python_tree.DIST_PACKAGES}/vmrun"],
    )

    use_pvh = PREFER_PVH and kern.vmlinux is not None
    manifest: dict[str, Any] = {
        "key": plan.key,
        "builder_version": BUILDER_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "guest_files_sha256": plan.inputs.guest_files,
        "packages": dict(plan.inputs.packages),
        "wheels": dict(plan.inputs.wheels),
        "agent_sha256": plan.inputs.agent,
        "agent_files": list(plan.agent.files),
        "kernel": {
            "package": plan.kernel_package,
            "version": plan.packages[plan.kernel_package].version,
            "release": kern.release,
            "boot": "pvh" if use_pvh else "bzimage",
            "pvh_available": kern.vmlinux is not None,
        },
        "modules": module_paths,
        "libraries": libraries,
        "busybox_applets": applets,
    }
    rootfs.write_guest_files(root, manifest, module_paths)
    rootfs.install_init(INIT_SCRIPT, root)
    tree_bytes, _entries = rootfs.tree_size(root)

    out = work / "out"
    out.mkdir()
    step("the root image (erofs) and the stage-1 initrd (cpio newc + lz4)")
    root_bytes = root_image.make_erofs(root, out / "root.erofs")
    cpio_bytes, entries = root_image.make_stage1(staging / "bin/busybox", tree, stage1_order, work,
                                                 out / "initrd.img")
    if use_pvh:
        assert kern.vmlinux is not None
        kernel_name = "vmlinux"
        (out / kernel_name).write_bytes(kern.vmlinux)
    else:
        kernel_name = "vmlinuz"
        shutil.copyfile(kern.bzimage, out / kernel_name)
    manifest["files"] = {"kernel": kernel_name, "initrd": "initrd.img", "root": "root.erofs"}
    manifest["stage1_modules"] = stage1_order
    manifest["sizes"] = {
        "kernel": (out / kernel_name).stat().st_size,
        "bzimage": None if plan.builds_kernel else kern.bzimage.stat().st_size,
        "vmlinux": len(kern.vmlinux) if kern.vmlinux is not None else None,
        "initrd": (out / "initrd.img").stat().st_size,
        "root": root_bytes,
        "cpio": cpio_bytes,
        "tree_bytes": tree_bytes,
        "entries": entries,
    }
    manifest["build_seconds"] = round(time.monotonic() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    debs.prune_debs(cache_dir / "debs", deb_paths.values())
    return out
