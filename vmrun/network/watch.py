"""Watching a network namespace for interfaces that come and go after the container was
created: dockerd's `network connect` and `disconnect` move a veth into (or out of) the
namespace of the pid it knows (container_netns.py) while the container runs.

An rtnetlink socket opened inside the namespace hears its link and address changes; once
they have been quiet for a moment (a new veth is moved in, renamed, addressed and set up
in quick steps), `on_change` runs, in the watcher's thread. The events come from the
host's own namespace, not from the guest; `on_change` must be idempotent (it is called
for changes of vmrun's own taps too).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Callable

from vmrun.network.netns import run_in_netns

log = logging.getLogger("vmrun.network.watch")

_NETLINK_ROUTE = 0
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
_QUIET = 0.5  # seconds without an event before acting


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
    sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    return sock


class NetnsWatcher:
    def __init__(self, netns_path: str, on_change: Callable[[], None]):
        self._sock = run_in_netns(netns_path, _netlink_socket)  # bound to that namespace for good
        self._on_change = on_change
        self._stop_read, self._stop_write = socket.socketpair()
        self._thread = threading.Thread(target=self._watch, name="netns-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop_write.send(b"x")
        self._thread.join(10)
        for sock in (self._sock, self._stop_read, self._stop_write):
            sock.close()

    def _watch(self) -> None:
        changed = False
        while True:
            ready, _, _ = select.select([self._sock, self._stop_read], [], [], _QUIET if changed else None)
            if self._stop_read in ready:
                return
            if self._sock in ready:
                try:
                    while self._sock.recv(65536, socket.MSG_DONTWAIT):
                        pass
                except BlockingIOError:
                    pass
                except OSError as exc:  # ENOBUFS: events were lost; a sync catches up anyway
                    log.debug("netlink: %s", exc)
                changed = True
                continue
            if changed:  # quiet for a moment: act on what happened
                changed = False
                try:
                    self._on_change()
                except Exception as exc:  # noqa: BLE001 - logged, and the next change retries
                    log.warning("carrying the namespace's new interfaces into the guest failed: %s", exc)
