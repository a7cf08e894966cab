"""Child processes of the in-guest agent: spawning, reaping, exit statuses.

The agent is the guest's PID 1, so every orphan (a container's init once crun's
intermediate process exits) becomes its child. One reaper thread collects every exit
status; nothing else may call wait(), which is why children are started with
os.posix_spawn rather than subprocess (whose Popen would wait() on its own).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence


def exit_status(wait_status: int) -> tuple[int, int]:
    """(runc-style exit status, signal): 128+N and N after death by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return 128 - code, -code
    return code, 0


class Reaper:
    """Reaps every child and keeps exit statuses until they are collected."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._statuses: dict[int, int] = {}
        self._children_possible = threading.Event()

    def start(self) -> "Reaper":
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children right now: sleep until the next spawn (orphans only
                # arrive while one of our children is alive).
                self._children_possible.clear()
                self._children_possible.wait(1.0)
                continue
            except InterruptedError:
                continue
            with self._cond:
                self._statuses[pid] = status
                self._cond.notify_all()

    def expect_children(self) -> None:
        self._children_possible.set()

    def wait(self, pid: int, timeout: float | None = None, keep: bool = False) -> int | None:
        """The raw wait status of `pid`, blocking until it exits; None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: pid in self._statuses, timeout):
                return None
            return self._statuses[pid] if keep else self._statuses.pop(pid)

    def forget(self, pid: int) -> None:
        with self._cond:
            self._statuses.pop(pid, None)


@dataclass
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class Spawner:
    """Starts children with posix_spawn and waits for them through the reaper."""

    def __init__(self, reaper: Reaper):
        self.reaper = reaper

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str] | None = None,
    ) -> int:
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        environment = dict(env if env is not None else os.environ)
        self.reaper.expect_children()
        return os.posix_spawn(argv[0], list(argv), environment, file_actions=actions)

    def run(self, argv: Sequence[str], *, input: bytes = b"", timeout: float | None = 60.0) -> CommandResult:
        """Run a command to completion, capturing stdout and stderr."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = self.spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        outputs: dict[int, bytes] = {}

        def drain(fd: int) -> None:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            outputs[fd] = b"".join(chunks)
            os.close(fd)

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for reader in readers:
            reader.start()
        try:
            if input:
                os.write(in_w, input)
        except BrokenPipeError:
            pass
        finally:
            os.close(in_w)
        status = self.reaper.wait(pid, timeout)
        if status is None:
            os.kill(pid, 9)
            status = self.reaper.wait(pid)
        for reader in readers:
            reader.join()
        code, _ = exit_status(status)
        return CommandResult(code, outputs.get(out_r, b""), outputs.get(err_r, b""))
