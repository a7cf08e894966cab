"""What `ps -ef` shows of a guest process, read from /proc for `vmrun ps` (ListProcesses)."""

from __future__ import annotations

import os
from pathlib import Path

from vmrun.agent import agent_pb2 as pb


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _tty_name(tty_nr: int) -> str:
    """As ps names a controlling terminal (from /proc/<pid>/stat's tty_nr)."""
    major, minor = (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"pts/{(major - 136) * 256 + minor}"
    if major == 4 and minor >= 64:
        return f"ttyS{minor - 64}"
    return "?" if tty_nr == 0 else f"{major},{minor}"


def process_info(pid: int) -> pb.ProcessInfo | None:
    """What `ps -ef` shows of a guest process; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (stat field 3): field n is fields[n - 3].
    ppid, tty_nr, utime, stime, start = int(fields[1]), int(fields[4]), int(fields[11]), int(fields[12]), int(fields[19])
    uid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), 0)
    return pb.ProcessInfo(pid=pid, ppid=ppid, uid=uid, user=str(uid), command=cmdline or f"[{comm}]",
                          cpu_time_ms=(utime + stime) * 1000 // _CLOCK_TICKS, tty=_tty_name(tty_nr),
                          age_ms=max(0, int((uptime - start / _CLOCK_TICKS) * 1000)))
