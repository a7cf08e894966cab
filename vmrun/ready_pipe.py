"""How a detached helper tells its starter it is ready: a pipe, "OK" or "ERR <why>".

Apart from vmrun.proc, which starts helpers: the helpers themselves (the shims, one per
container) import only this, and stay small.
"""

from __future__ import annotations

import os
import select
import time
from typing import TYPE_CHECKING

from vmrun.errors import CommandError

if TYPE_CHECKING:
    from vmrun.proc import HelperProcess


class ReadyPipe:
    """How a detached helper (sandbox daemon, shim) tells its starter it is ready.

    The starter passes `write_fd` to the child (pass_fds) and calls `wait()`; the child
    calls `report(fd)` once ready, or `report(fd, error)` with a one-line reason.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def wait(self, process: "HelperProcess", timeout: float) -> None:
        os.close(self.write_fd)
        deadline = time.monotonic() + timeout
        message = b""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandError(f"{process.name} was not ready within {timeout:g}s")
                readable, _, _ = select.select([self.read_fd], [], [], remaining)
                if not readable:
                    continue
                chunk = os.read(self.read_fd, 4096)
                if not chunk:
                    break
                message += chunk
        finally:
            os.close(self.read_fd)
        text = message.decode(errors="replace").strip()
        if text == "OK":
            return
        raise CommandError(text.removeprefix("ERR ") if text else f"{process.name} exited before it was ready")

    def discard(self) -> None:
        """Close both ends, for a child that will never report (or was never started)."""
        os.close(self.read_fd)
        os.close(self.write_fd)

    @staticmethod
    def report(fd: int, error: str | None = None) -> None:
        try:
            os.write(fd, b"OK" if error is None else f"ERR {error}".encode())
        finally:
            os.close(fd)
