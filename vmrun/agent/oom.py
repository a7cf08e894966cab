"""OOM kills in the guest's containers, from each container's cgroup (memory.events,
its oom_kill count): read when a process exits (WaitProcess says how many its container
has had), and watched for whoever subscribes (WatchOOM: the shim v2 publishes /tasks/oom,
`vmrun events` prints them). Polled, and only while someone watches: cgroup v2's
memory.events changes are also inotify events, but a poll of a few files twice a second
is simpler and costs nothing measurable."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

_POLL_INTERVAL = 0.5
_QUEUE_LIMIT = 256


def oom_kills(cgroup: Path | None) -> int:
    """The oom_kill count of a cgroup (0 when it is gone or says nothing)."""
    if cgroup is None:
        return 0
    try:
        for line in (cgroup / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


class OomWatch:
    """Polls the cgroups `cgroups()` names (container id -> cgroup) while subscribed; each
    subscriber gets (container id, count) for every rise of a count."""

    def __init__(self, cgroups: Callable[[], dict[str, Path]]):
        self._cgroups = cgroups
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[tuple[str, int]]] = []
        self._counts: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    def subscribe(self, alive: Callable[[], bool]) -> Iterator[tuple[str, int]]:
        """Events until `alive()` turns false (checked every poll interval)."""
        inbox: queue.Queue[tuple[str, int]] = queue.Queue(_QUEUE_LIMIT)
        with self._lock:
            self._subscribers.append(inbox)
            if self._thread is None or not self._thread.is_alive():
                self._counts = {cid: oom_kills(path) for cid, path in self._cgroups().items()}
                self._thread = threading.Thread(target=self._poll, name="oom-watch", daemon=True)
                self._thread.start()
        try:
            while alive():
                try:
                    yield inbox.get(timeout=_POLL_INTERVAL)
                except queue.Empty:
                    continue
        finally:
            with self._lock:
                self._subscribers.remove(inbox)

    def _poll(self) -> None:
        while True:
            with self._lock:
                if not self._subscribers:
                    self._thread = None
                    return
            cgroups = self._cgroups()
            for container_id, path in cgroups.items():
                count = oom_kills(path)
                if count > self._counts.setdefault(container_id, count):
                    self._counts[container_id] = count
                    with self._lock:
                        for inbox in self._subscribers:
                            try:
                                inbox.put_nowait((container_id, count))
                            except queue.Full:
                                pass  # a subscriber that does not read loses events, not memory
            for gone in set(self._counts) - set(cgroups):
                del self._counts[gone]
            time.sleep(_POLL_INTERVAL)
