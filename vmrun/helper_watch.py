"""A guest goes with any of its host helpers: when virtiofsd or the vsock backend dies,
the guest's files or its agent are gone for good, so QEMU is killed too and the sandbox
ends the way it does when QEMU itself dies (the daemon tears it down, the shims exit).
Without this the guest would live on, its containers stuck on a dead share, and every
call would wait for a gRPC deadline."""

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
