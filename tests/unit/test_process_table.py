"""`vmrun ps`'s table: ps -ef's columns, from what the agent reports of guest processes."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vmrun.process_table import process_table


@dataclass
class Process:
    pid: int
    ppid: int
    user: str
    command: str
    cpu_time_ms: int
    age_ms: int
    tty: str


def test_columns_as_ps_ef_writes_them():
    now = time.mktime((2026, 12, 6, 15, 30, 0, 0, 0, -1))
    table = process_table([
        Process(12, 1, "1000", "sleep 600", 250, 90 * 60_000, "?"),
        Process(1, 0, "0", "sh -c echo hi; exec sleep 600", 3_725_000, 10_000_000, "pts/0"),
        Process(30, 12, "0", "top", 90_000_000, 2 * 86_400_000, "pts/0"),
    ], now=now)
    lines = table.splitlines()
    assert lines[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    assert lines[1].split(None, 7) == ["0", "1", "0", "37", "12:43", "pts/0", "01:02:05",
                                       "sh -c echo hi; exec sleep 600"]
    assert lines[2].split() == ["1000", "12", "1", "0", "14:00", "?", "00:00:00", "sleep", "600"]
    # Started before today: the date; a day of CPU time and more: days first.
    assert lines[3].split() == ["0", "30", "12", "52", "Dec04", "pts/0", "1-01:00:00", "top"]
    # Columns line up: every CMD starts at the same offset.
    assert len({line.index(cmd) for line, cmd in zip(lines, ("CMD", "sh -c", "sleep", "top"))}) == 1


def test_no_processes_prints_the_header_only():
    assert process_table([], now=0).splitlines() == ["UID PID PPID C STIME TTY TIME CMD"]
