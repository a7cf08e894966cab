"""The guest's serial console, kept in a file of bounded size.

The guest writes to its console what it likes, as fast as it likes: QEMU hands it to a
pipe, and a thread of ours copies it to `path`. Once `path` holds `limit` bytes it becomes
`path.1` (the one before is dropped) and a new `path` starts: at most twice `limit` on
disk, and the newest output, which explains a failure, always kept. The thread reads all
the pipe holds as it comes: QEMU writes the console from its vCPU thread, which a full
pipe would stall.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CONSOLE_LIMIT = 1 << 20  # bytes per file: a boot and its agent's lines take ~10 KiB


class ConsoleLog:
    def __init__(self, path: Path, limit: int = CONSOLE_LIMIT):
        self.path, self.limit = path, limit
        self._read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._copy, name="guest-console", daemon=True)
        self._thread.start()

    @property
    def qemu_path(self) -> str:
        """Where QEMU's `-serial file:` writes, in QEMU (given `write_fd`)."""
        return f"/dev/fd/{self.write_fd}"

    def handed_over(self) -> None:
        """QEMU holds its own copy of the write end: ours goes, so the copy ends with QEMU."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _copy(self) -> None:
        written = 0
        out = open(self.path, "ab", buffering=0)
        try:
            while chunk := os.read(self._read_fd, 65536):
                if written + len(chunk) > self.limit:
                    out.close()
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    out, written = open(self.path, "ab", buffering=0), 0
                out.write(chunk)
                written += len(chunk)
        finally:
            out.close()
            os.close(self._read_fd)

    def close(self, timeout: float = 2.0) -> None:
        """Wait for the copy to end (once QEMU, the last writer, has gone)."""
        self.handed_over()
        self._thread.join(timeout)
