"""A guest goes with any of its host helpers: when virtiofsd or the vsock backend dies,
the guest's files or its agent are gone for good, so QEMU is killed too and the sandbox
ends the way it does when QEMU itself dies (the daemon tears it down, the shims exit).
Without this the guest would live on, its containers stuck on a dead share, and every
call would wait for a gRPC deadline. So it goes, too, when its agent stops answering
(a hung guest kernel): a health call every little while, and a few missed in a row."""

from __future__ import annotations

import logging
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
                log.error("%s exited: the guest goes with it", dead)
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
                log.error("the agent has not answered %d health calls in a row: the guest goes", misses)
                self._on_death("the agent")
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
