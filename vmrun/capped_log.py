"""A log a guest can fill, kept in a file of bounded size.

The guest writes to its console what it likes, as fast as it likes, and can make its
helpers (QEMU, virtiofsd) complain as often: such output goes to a pipe, and a thread of
ours copies it to `path`. Once `path` holds `limit` bytes it becomes `path.1` (the one
before is dropped) and a new `path` starts: at most twice `limit` on disk, and the newest
output, which explains a failure, always kept. The thread reads all the pipe holds as it
comes: QEMU writes the console from its vCPU thread, which a full pipe would stall.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable

LOG_LIMIT = 1 << 20  # bytes per file: a boot and its agent's lines take ~10 KiB


def _size(out: BinaryIO | None) -> int:
    return os.fstat(out.fileno()).st_size if out is not None else 0


class CappedLog:
    def __init__(self, path: Path, limit: int = LOG_LIMIT, watch: Callable[[bytes], None] | None = None):
        """`watch`, if any, sees every chunk as it passes (in the copying thread)."""
        self.path, self.limit = path, limit
        self._watch = watch
        self._read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._copy, name=f"log-{path.name}", daemon=True)
        self._thread.start()

    @property
    def path_in_child(self) -> str:
        """The write end as a path, in a child given `write_fd` (e.g. QEMU's `-serial file:`)."""
        return f"/dev/fd/{self.write_fd}"

    def handed_over(self) -> None:
        """The writer holds its own copy of the write end: ours goes, so the copy ends with it."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _copy(self) -> None:
        """Copy until every writer has gone. Whatever happens to the file (a full disk, a
        directory removed), the pipe is drained: its writer must never stall on it."""
        out = self._open()
        written = _size(out)
        try:
            while chunk := os.read(self._read_fd, 65536):
                if self._watch is not None:
                    try:
                        self._watch(chunk)
                    except Exception:  # noqa: BLE001 - a watcher's failure must not stall the writer
                        pass
                while chunk:
                    if written >= self.limit:
                        out, written = self._rotate(out), 0
                    part, chunk = chunk[:self.limit - written], chunk[self.limit - written:]
                    written += len(part)
                    if out is not None:
                        try:
                            out.write(part)
                        except OSError:
                            out.close()
                            out = None  # dropped, as the rest will be until the next rotation
        finally:
            if out is not None:
                out.close()
            os.close(self._read_fd)

    def _open(self) -> BinaryIO | None:
        try:
            return open(self.path, "ab", buffering=0)
        except OSError:
            return None

    def _rotate(self, out: BinaryIO | None) -> BinaryIO | None:
        if out is not None:
            out.close()
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError:
            pass
        return self._open()

    def close(self, timeout: float = 2.0) -> None:
        """Wait for the copy to end (once the last writer has gone)."""
        self.handed_over()
        self._thread.join(timeout)
