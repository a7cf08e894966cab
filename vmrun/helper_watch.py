"""A guest goes with any of its host helpers: when virtiofsd or the vsock backend dies,
the guest's files or its agent are gone for good, so QEMU is killed too and the sandbox
ends the way it does when QEMU itself dies (the daemon tears it down, the shims exit).
Without this the guest would live on, its containers stuck on a dead share, and every
call would wait for a gRPC deadline. So it goes, too, when its agent stops answering
(a hung guest kernel): a health call every little while, and a few missed in a row."""

from __future__ import annotations

import logging
import re
import threading
from typing import Callable

log = logging.getLogger("vmrun.helper_watch")

_INTERVAL = 0.25


class HelperWatch:
    """Checks `helpers` (name -> alive()) until close(); on the first death, `on_death(name)`."""

    def __init__(self, helpers: dict[str, Callable[[], bool]], on_death: Callable[[str], None]):
        self._helpers = helpers
        self._on_death = on_death
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="helper-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(_INTERVAL):
            dead = next((name for name, alive in self._helpers.items() if not alive()), None)
            if dead is not None:
                log.debug("%s exited", dead)
                self._on_death(dead)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


_KEEPALIVE_INTERVAL = 10.0
_KEEPALIVE_MISSES = 3  # in a row, each a 10 s health call: a slow guest under TCG is no hung one


class AgentKeepalive:
    """Calls `healthy()` every _KEEPALIVE_INTERVAL seconds until close(); after
    _KEEPALIVE_MISSES failures in a row, `on_death("the agent")`."""

    def __init__(self, healthy: Callable[[], bool], on_death: Callable[[str], None]):
        self._healthy = healthy
        self._on_death = on_death
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="agent-keepalive", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        misses = 0
        while not self._stop.wait(_KEEPALIVE_INTERVAL):
            try:
                misses = 0 if self._healthy() else misses + 1
            except Exception as exc:  # noqa: BLE001 - any failure to answer is a miss
                misses += 1
                log.debug("agent health: %s", exc)
            if misses >= _KEEPALIVE_MISSES and not self._stop.is_set():
                log.debug("the agent missed %d health calls in a row", misses)
                self._on_death("the agent")
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


# What the guest's kernel prints when it is broken for good: a task stuck in it would hold
# its container's exit, and the caller's wait, forever ("Fixing recursive fault but
# reboot is needed"); a virtqueue the driver found corrupt ("tx:id 2 is not a head!")
# is never used again, and every stream on it hangs. A guest that prints them on
# purpose only ends itself.
_KERNEL_FAILURES = re.compile(rb"kernel BUG at |Kernel panic - not syncing|:id \d+ (?:is not a head!|out of range)")


class ConsoleWatch:
    """Fed the guest's console as it comes (capped_log.py); on a kernel failure line,
    `on_death("the guest kernel")`, once."""

    def __init__(self, on_death: Callable[[str], None]):
        self._on_death = on_death
        self._tail = b""
        self._fired = False

    def __call__(self, chunk: bytes) -> None:
        if self._fired:
            return
        text = self._tail + chunk
        self._tail = text[-64:]  # a marker split between two chunks
        if _KERNEL_FAILURES.search(text):
            self._fired = True
            log.debug("a kernel failure on the guest console")
            self._on_death("the guest kernel")
