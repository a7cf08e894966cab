"""A host network namespace vmrun makes for a container whose spec asks for a new one.

With runc the container's pid lives in that namespace, and callers configure it through
the pid: dockerd's `libnetwork-setkey` prestart hook moves a veth into
/proc/<pid>/ns/net and gives it docker's address. Under vmrun that pid is the shim, so the
shim is started in a namespace of ours (lo up, as runc leaves it); after the hooks,
whatever they put there is carried into the guest like a CNI namespace. The namespace is
held by a bind mount of its nsfs file, as `ip netns add` does, until the container goes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vmrun.common import linux
from vmrun.errors import NetworkError
from vmrun.threads import InThread


def make_container_netns(path: Path) -> Path:
    """A new network namespace, with lo up, held at `path` (which must not exist)."""

    def create() -> None:
        # In a thread of its own: unshare(CLONE_NEWNET) moves only the calling thread,
        # which ends here; the bind mount keeps the namespace.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        linux.unshare(linux.CLONE_NEWNET)
        linux.set_link_up("lo")
        linux.bind_mount("/proc/thread-self/ns/net", str(path))

    try:
        InThread(create, "container-netns").result()
    except OSError as exc:
        remove_container_netns(path)
        raise NetworkError(f"cannot make a network namespace at {path}: {exc.strerror or exc}") from None
    return path


def remove_container_netns(path: Path) -> None:
    """Let go of the namespace at `path` (it ends once no process is left in it)."""
    if linux.is_mounted(str(path)):
        linux.umount(str(path), detach=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
