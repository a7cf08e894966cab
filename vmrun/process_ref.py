"""A host process named by its pid and its start time.

A pid read from state outlives the process it named: once that process is gone, the kernel
may give the pid to an unrelated one. Its start time (field 22 of /proc/PID/stat, in clock
ticks since boot) tells the two apart, so vmrun neither trusts nor signals a successor.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

log = logging.getLogger("vmrun.process")

# The start time of a ref made after its process had already gone: it never matches.
GONE = -1


class _Stat(NamedTuple):
    state: str  # R, S, D, Z, ...
    start_time: int


def _read_stat(pid: int) -> _Stat | None:
    """The state and start time of the process holding `pid`; None if none does."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:  # no such process, or it went while we read
        return None
    # The command name, field 2, is in parentheses and may hold spaces or ")": split after it.
    fields = text.rsplit(")", 1)[1].split()
    return _Stat(fields[0], int(fields[19]))  # fields 3 and 22


@dataclass(frozen=True)
class ProcessRef:
    """`pid` while it still names the process that started at `start_time`.

    start_time None is unknown (recorded by an older vmrun): the pid is trusted as it
    stands, as before, but never sent SIGKILL.
    """

    pid: int
    start_time: int | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """The process holding `pid` now (one already gone: a ref that is never alive).

        Take it while the pid cannot have been reused yet: a child not yet reaped, this
        process, or one just handed over by a process that holds it.
        """
        stat = _read_stat(pid) if pid > 0 else None
        return cls(pid, stat.start_time if stat is not None else GONE)

    @property
    def verified(self) -> bool:
        return self.start_time is not None

    def _is_ours(self, stat: _Stat | None) -> bool:
        """Whether `stat` is this process's (any process's, when the start time is unknown)."""
        return stat is not None and self.start_time in (None, stat.start_time)

    def alive(self) -> bool:
        """Whether the process runs (a zombie does not) and the pid is still its own."""
        if self.pid <= 0 or self.start_time == GONE:
            return False
        stat = _read_stat(self.pid)
        return stat is not None and self._is_ours(stat) and stat.state != "Z"

    def signal(self, signum: int) -> bool:
        """Send `signum` to this very process; whether it was sent.

        Nothing reaches a process that took over the pid: the pidfd pins the process it was
        opened on, so once its start time is checked, the signal cannot go to a successor.
        """
        if self.pid <= 0 or self.start_time == GONE:
            return False
        if self.start_time is None and signum == signal.SIGKILL:
            log.warning("not sending SIGKILL to pid %d: recorded without its start time, it may no longer "
                        "be ours", self.pid)
            return False
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if not self._is_ours(_read_stat(self.pid)):
                log.debug("pid %d is no longer the process recorded (start time %s): not signalled",
                          self.pid, self.start_time)
                return False
            signal.pidfd_send_signal(pidfd, signum)
            return True
        except ProcessLookupError:
            return False  # it exited meanwhile
        finally:
            os.close(pidfd)


def wait_until_gone(processes: Iterable[ProcessRef], timeout: float) -> list[ProcessRef]:
    """Wait up to `timeout` seconds for the processes to end; those still alive then."""
    deadline = time.monotonic() + timeout
    waiting = [p for p in processes if p.alive()]
    while waiting and time.monotonic() < deadline:
        time.sleep(0.02)
        waiting = [p for p in waiting if p.alive()]
    return waiting
