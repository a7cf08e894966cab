"""A task's root filesystem as containerd hands it over: mounts (an overlay of the
snapshotter's layers, or a bind of a directory) that the shim mounts on the bundle's
rootfs/ before the container is made, and takes down when the task is deleted. An empty
list means the caller prepared rootfs/ itself (`ctr run --rootfs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmrun import mounts
from vmrun.errors import VmrunError
from vmrun.proc import run

# The types containerd's snapshotters hand a runtime; anything else is refused in one line.
_TYPES = {"overlay", "bind", "rbind", "tmpfs", "ext4", "xfs", "btrfs"}


@dataclass(frozen=True)
class RootfsMount:
    type: str
    source: str
    options: tuple[str, ...]


def mount_rootfs(bundle: Path, layers: list[RootfsMount]) -> bool:
    """Mount `layers` on `bundle`/rootfs in order; True when something was mounted."""
    target = bundle / "rootfs"
    target.mkdir(mode=0o711, exist_ok=True)
    done = 0
    try:
        for layer in layers:
            kind = "none" if layer.type in ("bind", "rbind") else layer.type
            if layer.type not in _TYPES:
                raise VmrunError(f"rootfs: mount type {layer.type!r} is not supported")
            options = list(layer.options)
            if layer.type in ("bind", "rbind") and not {"bind", "rbind"} & set(options):
                options.append("rbind")
            argv = ["mount", "-t", kind, *(["-o", ",".join(options)] if options else []), layer.source, str(target)]
            result = run(argv, check=False)
            if result.returncode != 0:
                raise VmrunError(f"rootfs: cannot mount {layer.type} {layer.source}: "
                                 f"{result.stderr.decode(errors='replace').strip()}")
            done += 1
    except BaseException:
        if done:
            unmount_rootfs(bundle)
        raise
    return bool(layers)


def unmount_rootfs(bundle: Path) -> None:
    """Take down whatever is mounted on `bundle`/rootfs (every layer of a stack)."""
    mounts.detach(bundle / "rootfs")
