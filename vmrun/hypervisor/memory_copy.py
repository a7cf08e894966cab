"""A clone's private copy of its template's RAM file, made in the background.

The copy goes into a file that has its final size from the start, and is never
truncated, so QEMU can open and map it while the copy runs: QEMU starts meanwhile and
touches guest RAM only once it loads the device state, after `wait()`. Only the
template's data extents are copied (SEEK_DATA/SEEK_HOLE); its holes stay holes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from typing import Iterator

from vmrun.common import linux
from vmrun.errors import HypervisorError

_CHUNK = 16 << 20  # bytes per copy call: close() is noticed between chunks


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of data in the file, holes left out."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        offset = end
    return extents


def punch_zero_pages(path: Path, page_size: int = 4096) -> int:
    """Turn the runs of all-zero pages in a RAM file into holes; the bytes punched.

    The file reads the same, but a clone's copy skips the holes: less to copy at each
    start, and less memory per clone.
    """
    punched = 0
    with open(path, "r+b") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            for offset, length in data_extents(fd, size):
                for start, run in _zero_runs(view, offset, offset + length, page_size):
                    linux.punch_hole(fd, start, run)
                    punched += run
    return punched


def _zero_runs(view: mmap.mmap, start: int, end: int, page_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of all-zero pages between `start` and `end`."""
    zero = bytes(page_size)
    run_start = None
    for page in range(start, end, page_size):
        if view[page:page + page_size] == zero:
            run_start = page if run_start is None else run_start
        elif run_start is not None:
            yield run_start, page - run_start
            run_start = None
    if run_start is not None:
        yield run_start, end - run_start


def _copy_range(source: int, target: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        count = min(_CHUNK, length - done)
        try:
            copied = os.copy_file_range(source, target, count, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.lseek(target, offset + done, os.SEEK_SET)  # sendfile writes at the file position
            copied = os.sendfile(target, source, offset + done, count)
        if copied == 0:
            raise HypervisorError(f"the template's memory ended early, at {offset + done} bytes")
        done += copied


class MemoryCopy:
    """Copy `source` into the empty file open as `target` (a memfd), in a thread; `wait()`
    for it, `close()` to stop it. `target` stays the caller's to close."""

    def __init__(self, source: Path, target: int):
        self.source = source
        self.target = target
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "MemoryCopy":
        source = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(source).st_size
            target = os.dup(self.target)  # the thread's own: it closes it when done
        except BaseException:
            os.close(source)
            raise
        try:
            os.ftruncate(target, size)  # its final size now: QEMU may map it at once
        except BaseException:
            os.close(source)
            os.close(target)
            raise
        self._thread = threading.Thread(target=self._run, args=(source, target, size),
                                        name="memory-copy", daemon=True)
        self._thread.start()
        return self

    def _run(self, source: int, target: int, size: int) -> None:
        try:
            for offset, length in data_extents(source, size):
                if self._stop.is_set():
                    raise HypervisorError("the template's memory copy was stopped")
                _copy_range(source, target, offset, length)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc
        finally:
            os.close(source)
            os.close(target)

    def wait(self, timeout: float) -> None:
        """Block until the copy is complete; raises what stopped it."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise HypervisorError(f"the template's memory was not copied within {timeout:g}s")
        if self._error is not None:
            raise HypervisorError(f"cannot copy the template's memory: {self._error}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "MemoryCopy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
