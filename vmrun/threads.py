"""A function run in a thread of its own; its result (or its exception) taken later."""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class InThread(Generic[T]):
    """Starts `function` in a thread at once; `result()` waits for what it returned."""

    def __init__(self, function: Callable[[], T], name: str):
        self._outcome: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(function,), name=name, daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], T]) -> None:
        try:
            self._outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - raised where the result is taken
            self._outcome["error"] = exc

    def result(self, poll: float | None = None) -> T:
        """What the function returned, or its exception raised here. With `poll`, the wait
        wakes that often, so the caller's signal handlers run meanwhile."""
        while self._thread.is_alive():
            self._thread.join(poll)
        if "error" in self._outcome:
            raise self._outcome["error"]  # type: ignore[misc]
        return self._outcome["value"]  # type: ignore[return-value]
