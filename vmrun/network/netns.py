"""Running a function inside a network namespace, in a thread of its own.

setns(CLONE_NEWNET) moves only the calling thread: the function runs in a short-lived
thread that joins the namespace, so the rest of the process stays where it was. Netlink
sockets and taps opened there belong to that namespace for good, whoever uses them later.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from vmrun.common import linux
from vmrun.errors import BundleError, NetworkError
from vmrun.namespaces import NAMESPACE_FLAGS, open_namespace
from vmrun.threads import InThread

T = TypeVar("T")

_CLONE_NEWNET = NAMESPACE_FLAGS["network"]


def _open_netns(path: str) -> int:
    try:
        return open_namespace(path, "network")
    except BundleError as exc:
        raise NetworkError(str(exc)) from None


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
