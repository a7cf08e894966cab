"""The guest's share (what virtiofsd serves), laid out so that the host never follows a
path the guest can write.

In a sandbox's directory (0700, the host's own):
    staging/                   made by the host, never served: the share's skeleton
    shared/                    staging/ bound read-only: virtiofsd's source
      <id>/rootfs              the bundle's rootfs, mounted here
      <id>/mounts/<n>          the source of the spec's bind mount number n

The guest writes through virtiofsd, so inside the mounts it may do anything, but the
skeleton it sees is read-only: it cannot create, rename, or swap for a symbolic link any
directory the host mounts on (the CVE-2020-2026 kind of attack on Kata). Mounts go on
shared/, never on staging/: removing a container's staging/ never reaches its files, and
one lazy unmount of shared/ takes all of a sandbox's mounts with it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmrun import mounts
from vmrun.errors import BundleError
from vmrun.oci import Bundle, is_bind_mount, is_host_root

SHARED = "shared"
STAGING = "staging"

# The guest can run nothing from the host's view of its files, nor use a device node
# through it; the rootfs and volumes are theirs to write (or not: "ro").
_SHARED_MOUNT_ATTRIBUTES = mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_NODEV
_SKELETON_ATTRIBUTES = _SHARED_MOUNT_ATTRIBUTES | mounts.MOUNT_ATTR_RDONLY | mounts.MOUNT_ATTR_NOEXEC


def make_share(vm_dir: Path) -> Path:
    """Make the sandbox's share in `vm_dir` (staging/ and its read-only view shared/); the
    path to serve. `remove_share` undoes it."""
    staging, shared = vm_dir / STAGING, vm_dir / SHARED
    staging.mkdir(mode=0o755)
    shared.mkdir(mode=0o755)
    mounts.bind(staging, shared, _SKELETON_ATTRIBUTES)
    return shared


def remove_share(vm_dir: Path) -> None:
    """Unmount the share and every container mount on it (their files stay as they are)."""
    mounts.detach(vm_dir / SHARED)


def share_container_files(shared_dir: Path, container_id: str, bundle: Bundle) -> None:
    """Mount the container's rootfs and bind-mount sources on the sandbox's share."""
    staging = shared_dir.parent / STAGING / container_id
    try:
        # Every directory made here is new (mkdir fails on what exists): made by us, in a
        # tree the guest cannot write.
        (staging / "mounts").mkdir(parents=True, mode=0o755)
        (staging / "rootfs").mkdir(mode=0o755)
        _mount_rootfs(bundle, shared_dir / container_id / "rootfs")
        for index, mount in enumerate(bundle.spec.get("mounts", [])):
            if is_bind_mount(mount):
                _mount_volume(bundle, mount, staging / "mounts" / str(index),
                              shared_dir / container_id / "mounts" / str(index))
    except BaseException:
        unshare_container_files(shared_dir, container_id)
        raise


def _mount_rootfs(bundle: Bundle, target: Path) -> None:
    tree = mounts.clone_tree(bundle.rootfs, _SHARED_MOUNT_ATTRIBUTES)
    try:
        # What is mounted is what was checked: the path may have changed since the bundle
        # was loaded.
        if is_host_root(os.fstat(tree)):
            raise BundleError(f"bundle {bundle.path}: rootfs {bundle.rootfs} is the host's root directory")
        mounts.attach(tree, target)
    finally:
        os.close(tree)


def _mount_volume(bundle: Bundle, mount: dict, mount_point: Path, target: Path) -> None:
    source = Path(mount.get("source", ""))
    if not source.is_absolute():
        source = bundle.path / source
    if not source.exists():
        raise BundleError(f"bundle {bundle.path}: mount source {source} does not exist")
    if source.is_dir():
        mount_point.mkdir(mode=0o755)
    else:
        os.close(os.open(mount_point, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
    # Read-only on the host side too, recursively: the guest must not be able to write a
    # volume its spec mounts read-only, nor anything mounted below it. As runc: "rbind"
    # brings the source's submounts along, "bind" does not.
    options = mount.get("options") or []
    readonly = "ro" in options
    mounts.bind(source, target, _SHARED_MOUNT_ATTRIBUTES | (mounts.MOUNT_ATTR_RDONLY if readonly else 0),
                recursive="rbind" in options)


def unshare_container_files(shared_dir: Path, container_id: str) -> None:
    """Unmount what `share_container_files` mounted for the container, and remove its
    mount points. Only mount points the kernel lists are unmounted (the outermost ones,
    lazily, without following links); the guest's files are never walked."""
    for point in mounts.outermost_mounts_under(shared_dir / container_id):
        mounts.detach(point)
    staging = shared_dir.parent / STAGING / container_id
    shutil.rmtree(staging, ignore_errors=True)  # only our mount points, empty once unmounted
