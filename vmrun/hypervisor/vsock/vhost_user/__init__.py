"""A userspace vhost-user-vsock backend exposing the guest's vsock as hybrid vsock.

QEMU's `vhost-user-vsock-pci` device hands its rx and tx virtqueues to this process over a
unix socket; we move packets between those rings and unix sockets on the host. Run it as
`python -m vmrun.hypervisor.vsock.vhost_user --socket PATH --uds PATH --cid N`.
"""

from .backend import VsockBackend

__all__ = ["VsockBackend"]
