"""Running a function inside a network namespace, in a thread of its own.

setns(CLONE_NEWNET) moves only the calling thread: the function runs in a short-lived
thread that joins the namespace, so the rest of the process stays where it was. Netlink
sockets and taps opened there belong to that namespace for good, whoever uses them later.
"""

from __future__ import annotations

import fcntl
import os
from typing import Callable, TypeVar

from vmrun.common import linux
from vmrun.errors import NetworkError
from vmrun.threads import InThread

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)


def _open_netns(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"network namespace {path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != _CLONE_NEWNET:
        os.close(fd)
        raise NetworkError(f"{path} is not a network namespace")
    return fd


def check_netns(path: str) -> None:
    """A clear error now, before a guest boots, if `path` is no network namespace."""
    os.close(_open_netns(path))


def _join(path: str) -> None:
    fd = _open_netns(path)
    try:
        linux.setns(fd, _CLONE_NEWNET)
    except OSError as exc:
        raise NetworkError(f"cannot enter network namespace {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def run_in_netns(path: str, function: Callable[[], T]) -> T:
    """`function()`, run in the network namespace at `path`; its result or its exception."""

    def joined() -> T:
        _join(path)
        return function()

    # A thread of its own: setns changes only the calling thread's namespace.
    return InThread(joined, "netns").result()
