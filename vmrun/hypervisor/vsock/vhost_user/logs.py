"""The backend's log, which the guest must not be able to grow at will.

Whatever a guest does repeatedly (faults, resets, vhost-user re-configurations through
device resets) can reach the log, so lines are rate-limited, and the file, stderr as
HelperProcess redirects it, is capped: past LOG_MAX_BYTES it is cut back to its start-up
lines and goes on from there.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

# At most LOG_BURST lines per LOG_WINDOW seconds, then one line saying how many were
# dropped: ample for a healthy backend (a handful of lines per guest start and stop), and
# from a guest that triggers lines nonstop, one every 2 s on average (~6 MB a day, of
# which the cap below keeps the last MiB).
LOG_BURST = 30
LOG_WINDOW = 60.0
# The log file's size cap: thousands of lines, and next to nothing beside the guest's RAM.
LOG_MAX_BYTES = 1024 * 1024
# One record's most (a traceback is ~2 KiB; nothing a guest sends is logged at length).
MAX_RECORD_BYTES = 8192
# If the start-up lines (from earlier runs too: the file is appended to) are more than
# this share of the cap, a cut drops them as well.
_MAX_HEAD_SHARE = 2

FORMAT = "%(asctime)s vsock-backend[%(process)d] %(levelname)s %(message)s"


@dataclass
class RateLimiter:
    """Fixed windows of `window` seconds, each letting `burst` events through."""

    burst: int
    window: float
    clock: Callable[[], float] = time.monotonic
    suppressed: int = 0  # dropped since the last take_suppressed()
    _window_start: float = field(default=float("-inf"), init=False)
    _count: int = field(default=0, init=False)

    def allow(self) -> bool:
        now = self.clock()
        if now - self._window_start >= self.window:
            self._window_start, self._count = now, 0
        if self._count < self.burst:
            self._count += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class BoundedLogHandler(logging.Handler):
    """Writes records to `fd` (stderr), rate-limited by `limiter` (None: every record),
    keeping a regular file under `max_bytes`."""

    def __init__(self, fd: int = 2, limiter: RateLimiter | None = None,
                 max_bytes: int = LOG_MAX_BYTES) -> None:
        super().__init__()
        self.fd = fd
        self.limiter = limiter
        self.max_bytes = max_bytes
        self.cuts = 0
        try:
            self._capped = stat.S_ISREG(os.fstat(fd).st_mode)  # a pipe or tty: not ours to cap
        except OSError:
            self._capped = False
        self._head = 0  # bytes kept when the file is cut: the start-up lines
        self.mark_head()

    def mark_head(self) -> None:
        """What the file holds now is kept when it is cut (call once start-up is logged)."""
        if self._capped:
            size = os.fstat(self.fd).st_size
            self._head = size if size <= self.max_bytes // _MAX_HEAD_SHARE else 0

    def emit(self, record: logging.LogRecord) -> None:
        limiter = self.limiter
        if limiter is not None and not limiter.allow():
            return
        try:
            text = self._line(record)
            dropped = limiter.take_suppressed() if limiter is not None else 0
            if dropped:
                text = self._note(f"suppressed {dropped} log messages (at most "
                                  f"{limiter.burst} per {limiter.window:g}s)") + text
            self._write(text)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        # Say what the last window dropped, if anything: no later record will.
        if self.limiter is not None and self.limiter.suppressed:
            try:
                self._write(self._note(
                    f"suppressed {self.limiter.take_suppressed()} log messages"))
            except OSError:
                pass
        super().close()

    def _line(self, record: logging.LogRecord) -> bytes:
        data = (self.format(record) + "\n").encode("utf-8", "replace")
        if len(data) > MAX_RECORD_BYTES:
            data = data[:MAX_RECORD_BYTES - 5] + b" ...\n"
        return data

    def _note(self, message: str) -> bytes:
        """A line of the handler's own, formatted like the others."""
        return self._line(logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": message,
        }))

    def _write(self, data: bytes) -> None:
        if self._capped and os.fstat(self.fd).st_size + len(data) > self.max_bytes:
            self.cuts += 1
            os.ftruncate(self.fd, self._head)
            os.lseek(self.fd, 0, os.SEEK_END)  # for an fd opened without O_APPEND
            data = self._note(f"log cut #{self.cuts}: lines after start-up dropped to "
                              f"stay under {self.max_bytes} bytes") + data
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def configure(verbose: bool, fd: int = 2) -> BoundedLogHandler:
    """Send every log record of the process through one bounded handler on `fd` (stderr).

    Verbose (debug) logging is for a person watching: it is not rate-limited, only capped.
    """
    handler = BoundedLogHandler(
        fd, limiter=None if verbose else RateLimiter(LOG_BURST, LOG_WINDOW))
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
