"""`vmrun ps`: the container's processes as the guest sees them, in the columns of runc's
default (`ps -ef`): UID PID PPID C STIME TTY TIME CMD."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class GuestProcess(Protocol):
    pid: int
    ppid: int
    user: str
    command: str
    cpu_time_ms: int
    age_ms: int
    tty: str


@dataclass(frozen=True)
class _Row:
    uid: str
    pid: str
    ppid: str
    c: str
    stime: str
    tty: str
    time: str
    cmd: str


_HEADER = _Row("UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD")


def _cpu_time(ms: int) -> str:
    seconds = ms // 1000
    days, seconds = divmod(seconds, 86400)
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{days}-{text}" if days else text


def _start_time(age_ms: int, now: float) -> str:
    # From its age, not the guest's clock (a clone's may lag the host's): ps's format,
    # the time today, the date before.
    started = time.localtime(now - age_ms / 1000)
    if time.strftime("%Y%m%d", started) == time.strftime("%Y%m%d", time.localtime(now)):
        return time.strftime("%H:%M", started)
    return time.strftime("%b%d", started)


def process_table(processes: list[GuestProcess], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [_HEADER]
    for process in sorted(processes, key=lambda p: p.pid):
        usage = 100 * process.cpu_time_ms // process.age_ms if process.age_ms else 0
        rows.append(_Row(process.user, str(process.pid), str(process.ppid), str(min(usage, 99)),
                         _start_time(process.age_ms, now), process.tty or "?", _cpu_time(process.cpu_time_ms),
                         process.command))
    widths = [max(len(getattr(row, column)) for row in rows) for column in ("uid", "pid", "ppid", "c", "stime",
                                                                             "tty", "time")]
    lines = []
    for row in rows:
        cells = (row.uid.ljust(widths[0]), row.pid.rjust(widths[1]), row.ppid.rjust(widths[2]),
                 row.c.rjust(widths[3]), row.stime.ljust(widths[4]), row.tty.ljust(widths[5]),
                 row.time.rjust(widths[6]), row.cmd)
        lines.append(" ".join(cells))
    return "\n".join(lines) + "\n"
