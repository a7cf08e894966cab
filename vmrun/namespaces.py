"""Namespace files a spec names (`linux.namespaces[].path`): each must be a namespace of
the type it is given for, as runc checks, before anything is made for the container."""

from __future__ import annotations

import fcntl
import os

from vmrun.errors import BundleError

# The CLONE_NEW* flag NS_GET_NSTYPE answers, for each OCI namespace type.
NAMESPACE_FLAGS = {
    "mount": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
    "user": 0x10000000, "pid": 0x20000000, "network": 0x40000000, "time": 0x00000080,
}
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)


def namespace_type(fd: int) -> str | None:
    """The OCI type of the namespace open as `fd`; None if it is no namespace."""
    try:
        flag = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return None
    return next((name for name, value in NAMESPACE_FLAGS.items() if value == flag), None)


def open_namespace(path: str, expected: str) -> int:
    """`path` opened, once checked to be a namespace of type `expected`; else BundleError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{expected} namespace {path}: {exc.strerror}") from None
    found = namespace_type(fd)
    if found != expected:
        os.close(fd)
        raise BundleError(f"{path} is not a {expected} namespace"
                          + (f" but a {found} one" if found else ": not a namespace file"))
    return fd


def check_namespace_paths(spec: dict) -> None:
    """Each namespace path in `spec` is a namespace of its type."""
    linux = spec.get("linux")
    for namespace in (linux.get("namespaces") or [] if isinstance(linux, dict) else []):
        if not isinstance(namespace, dict) or namespace.get("type") not in NAMESPACE_FLAGS:
            raise BundleError(f"linux.namespaces: unknown namespace {namespace!r}")
        if namespace.get("path"):
            os.close(open_namespace(str(namespace["path"]), namespace["type"]))
