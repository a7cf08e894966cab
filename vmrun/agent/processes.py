"""Child processes of the in-guest agent: spawning, reaping, exit statuses.

The agent is the guest's PID 1, so every orphan (a container's init once crun's
intermediate process exits) becomes its child. One reaper thread collects every exit
status; nothing else may call wait(), which is why children are started with
os.posix_spawn rather than subprocess (whose Popen would wait() on its own).

Exit statuses are kept only for processes someone registered interest in (a `Child`),
and each is stored on that Child rather than under its pid: a pid is reused once reaped,
so a pid alone cannot tell an old process's status from a new one's.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from vmrun.common import linux

# Statuses of processes nobody registered (yet): a container's init may exit before the
# agent has read its pid from crun's pid file. Only the most recent ones are kept.
_UNCLAIMED_LIMIT = 1024


def exit_status(wait_status: int) -> tuple[int, int]:
    """(runc-style exit status, signal): 128+N and N after death by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return 128 - code, -code
    return code, 0


class Child:
    """A process whose exit someone waits for; `status` is its raw wait status once reaped."""

    def __init__(self, pid: int, status: int | None = None):
        self.pid = pid
        self.status = status

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, status={self.status})"


class Reaper:
    """Reaps every child and hands exit statuses to the Child registered for each."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: dict[int, Child] = {}  # registered, not reaped yet
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._children_possible = threading.Event()

    def start(self) -> "Reaper":
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            # Cleared before waiting: a spawn that comes after the ECHILD below has set it
            # again, so the wait for it returns at once instead of after its timeout.
            self._children_possible.clear()
            try:
                # WNOWAIT: only learn which child died; it is reaped under the lock.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                # No children right now: sleep until the next spawn (orphans only
                # arrive while one of our children is alive).
                self._children_possible.wait(1.0)
                continue
            if info is not None:
                self._collect(info.si_pid)

    def _collect(self, pid: int) -> None:
        # Reaping under the lock keeps the pid reserved (as a zombie) until its status is
        # recorded, so nobody registers or signals a reused pid in between.
        with self._cond:
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped != pid:
                return
            child = self._live.pop(pid, None)
            if child is not None:
                child.status = status
                self._cond.notify_all()
                return
            self._unclaimed[pid] = status
            self._unclaimed.move_to_end(pid)
            while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                self._unclaimed.popitem(last=False)

    def spawn(self, start: Callable[[], int]) -> Child:
        """Run `start`, which creates a child and returns its pid, and watch that child.

        Under the lock, so the child cannot be reaped before it is registered."""
        with self._cond:
            pid = start()
            self._children_possible.set()  # after the child exists: see _loop
            self._unclaimed.pop(pid, None)  # an earlier process's, whose pid this one reuses
            child = self._live[pid] = Child(pid)
            return child

    def watch(self, pid: int) -> Child:
        """Watch a process that was not spawned here (a container's init, reparented to
        the agent): it may have exited and been reaped already."""
        with self._cond:
            child = self._live.get(pid)
            if child is not None:
                return child
            status = self._unclaimed.pop(pid, None)
            # A living process under that pid makes the status an earlier process's.
            if status is not None and not linux.pid_exists(pid):
                return Child(pid, status)
            child = self._live[pid] = Child(pid)
            return child

    def wait(self, child: Child, timeout: float | None = None) -> int | None:
        """The raw wait status of `child`, blocking until it exits; None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: child.status is not None, timeout)
            return child.status

    def kill(self, child: Child, signum: int) -> bool:
        """Signal `child` unless it has exited (its pid may be another process's by now)."""
        with self._cond:  # it cannot be reaped while we hold the lock
            if child.status is not None:
                return False
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                return False
            return True


@dataclass
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


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
    ) -> Child:
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        environment = dict(env if env is not None else os.environ)
        # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across
        # exec: crun and the container would never die of them (`yes | head -1` would
        # run on). Children start with both at their defaults and nothing blocked.
        return self.reaper.spawn(lambda: os.posix_spawn(argv[0], list(argv), environment, file_actions=actions,
                                                        setsigdef=_DEFAULT_SIGNALS, setsigmask=()))

    def run(self, argv: Sequence[str], *, input: bytes = b"", timeout: float | None = 60.0) -> CommandResult:
        """Run a command to completion, capturing stdout and stderr."""
        fds: list[int] = []
        try:
            for _ in range(3):
                fds += os.pipe()
            in_r, in_w, out_r, out_w, err_r, err_w = fds
            child = self.spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w)
        except BaseException:
            _close_all(fds)
            raise
        _close_all((in_r, out_w, err_w))  # the child's ends
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
        status = self.reaper.wait(child, timeout)
        if status is None:
            self.reaper.kill(child, signal.SIGKILL)
            status = self.reaper.wait(child)
        assert status is not None
        for reader in readers:
            reader.join()
        code, _ = exit_status(status)
        return CommandResult(code, outputs.get(out_r, b""), outputs.get(err_r, b""))
