"""Picking a vsock transport: kernel vhost-vsock where the host has it, our hybrid backend
otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.hypervisor.vsock.base import VsockTransport
from vmrun.hypervisor.vsock.hybrid import HybridVsock
from vmrun.hypervisor.vsock.kernel import KernelVsock

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"


def kernel_vsock_available(device: str = VHOST_VSOCK_DEVICE) -> bool:
    """Whether QEMU could open the kernel's vhost-vsock device (exists, and we may open it)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def make_transport(run_dir: Path, guest_cid: int) -> VsockTransport:
    """The best vsock transport this host offers for a guest with `guest_cid`."""
    if kernel_vsock_available():
        return KernelVsock(guest_cid)
    return HybridVsock(run_dir, guest_cid)
