"""`vmrun monitor --listen HOST:PORT`: the host's pods as Prometheus metrics (as kata-monitor).

Every scrape of `/metrics` reads the host afresh; nothing is kept between scrapes:
- the pods: each sandbox's host processes name its directory (`<run_dir>/vm/<hash>/`) in
  their command lines: QEMU its QMP socket, virtiofsd its socket, the vsock backend its
  socket. One pass over /proc finds them; the process holding the guest (the sandbox
  daemon, `vmrun run`, or the shim v2) is QEMU's parent.
- each sandbox's id, boot timings and guest RAM: `sandbox.json` in its directory, which
  the sandbox writes once booted and again when it grows (vmrun/sandbox.py). QMP is no
  source: QEMU connects to a socket the sandbox listened on once, so no second client can.
- CPU time and RSS of each process: /proc/PID/stat and /proc/PID/status.
- the pool's idle guests: its `status` on `pool_socket` (vmrun/pool.py keeps them in the
  pool process's memory only).

See docs/monitoring.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from vmrun.config import Config
from vmrun.errors import VmrunError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("vmrun.monitor")

DEFAULT_LISTEN = "127.0.0.1:8090"
# Each role's process, as `process` labels it.
QEMU, VIRTIOFSD, VSOCK_BACKEND, DAEMON = "qemu", "virtiofsd", "vsock_backend", "daemon"
_SANDBOX_RECORD = "sandbox.json"  # vmrun.sandbox.SANDBOX_RECORD (not imported: it pulls in the whole sandbox)
_MIB = 1 << 20


class ListenAddressError(VmrunError):
    """`--listen` is not HOST:PORT, or nothing can listen there."""


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[V6]:PORT` for an IPv6 address) as (host, port); an empty host
    (`:8090`) is every IPv4 address."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ListenAddressError(f"monitor: --listen {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError(f"monitor: --listen {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ListenAddressError(f"monitor: --listen {text!r}: the port must be a number from 1 to 65535")
    return host or "0.0.0.0", int(port_text)


# --- /proc --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """One host process as /proc shows it: enough to tell what it serves."""

    pid: int
    ppid: int
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    rss_bytes: int


def _stat_fields(stat_text: str) -> list[str]:
    # The fields after the command name, which is in parentheses and may hold spaces and
    # parentheses itself: split after its last ")". Field 3 (state) comes first.
    return stat_text[stat_text.rindex(")") + 2:].split()


def parse_stat_ppid(stat_text: str) -> int:
    return int(_stat_fields(stat_text)[1])


def parse_stat_cpu_seconds(stat_text: str, ticks_per_second: int) -> float:
    """utime + stime (fields 14 and 15: all the process's threads) in seconds."""
    fields = _stat_fields(stat_text)
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def parse_status_rss_bytes(status_text: str) -> int:
    """VmRSS of /proc/PID/status in bytes; 0 for a process with no memory (a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit == "kB" else int(value)
    return 0


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def scan_processes(mentioning: str, proc: str = "/proc") -> list[ProcessInfo]:
    """The processes whose command line holds `mentioning`; each read once, those gone
    meanwhile skipped."""
    needle = mentioning.encode()
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/cmdline", "rb") as file:
                raw = file.read()
            if needle not in raw:
                continue
            ppid = parse_stat_ppid(_read(f"{entry.path}/stat"))
        except (OSError, ValueError, IndexError):
            continue  # gone, or (a kernel thread) nothing to read
        found.append(ProcessInfo(int(entry.name), ppid,
                                 tuple(arg.decode(errors="replace") for arg in raw.rstrip(b"\0").split(b"\0"))))
    return found


def usage_of(pid: int, ticks_per_second: int, proc: str = "/proc") -> Usage | None:
    """CPU time and RSS of `pid`; None once it is gone."""
    try:
        cpu = parse_stat_cpu_seconds(_read(f"{proc}/{pid}/stat"), ticks_per_second)
        rss = parse_status_rss_bytes(_read(f"{proc}/{pid}/status"))
    except (OSError, ValueError, IndexError):
        return None
    return Usage(cpu, rss)


# --- which process serves which sandbox ---------------------------------------------------


def role_of(cmdline: tuple[str, ...]) -> str | None:
    """What a process naming a sandbox's directory is to it, by what it was told to serve
    (not by its program's name: `qemu` in vmrun.toml may be any binary or wrapper)."""
    if any(arg.startswith("socket,id=qmp,path=") and arg.endswith("/qmp.sock") for arg in cmdline):
        return QEMU
    if any(arg.startswith("--socket-path=") and arg.endswith("/virtiofsd.sock") for arg in cmdline):
        return VIRTIOFSD  # also while seccomp_exec.py is about to exec it
    if "vmrun.hypervisor.vsock.vhost_user" in cmdline:
        return VSOCK_BACKEND
    return None  # a shim, or anything else that names the directory


@dataclass
class SandboxProcesses:
    """The host processes serving the sandbox in one directory, by role."""

    name: str  # the directory's name
    pids: dict[str, list[int]] = field(default_factory=dict)


def attribute(processes: Iterable[ProcessInfo], vm_root: Path) -> dict[str, SandboxProcesses]:
    """The processes of each sandbox directory under `vm_root`, by the directory their
    command line names; the daemon is QEMU's parent (it holds the guest)."""
    # The whole path: at the start of an argument or of an option's value, never inside another path.
    in_dir = re.compile(r"(?:^|[=,])" + re.escape(str(vm_root)) + r"/([0-9a-f]{16})(?=/|$)")
    found: dict[str, SandboxProcesses] = {}
    for process in processes:
        role = role_of(process.cmdline)
        if role is None:
            continue
        match = next((m for m in map(in_dir.search, process.cmdline) if m is not None), None)
        if match is None:
            continue
        sandbox = found.setdefault(match.group(1), SandboxProcesses(match.group(1)))
        sandbox.pids.setdefault(role, []).append(process.pid)
        if role == QEMU and process.ppid > 1:
            sandbox.pids.setdefault(DAEMON, []).append(process.ppid)
    return found


# --- what each sandbox says of itself -----------------------------------------------------


@dataclass(frozen=True)
class SandboxRecord:
    sandbox_id: str
    timings: dict[str, float]
    memory_mib: int


def parse_record(text: str) -> SandboxRecord | None:
    """sandbox.json, or None if it is not what vmrun/sandbox.py writes."""
    try:
        data = json.loads(text)
        timings = {str(k): float(v) for k, v in dict(data.get("timings") or {}).items()}
        return SandboxRecord(str(data["sandbox_id"]), timings, int(data.get("memory_mib") or 0))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def read_record(sandbox_dir: Path) -> SandboxRecord | None:
    try:
        return parse_record((sandbox_dir / _SANDBOX_RECORD).read_text())
    except OSError:
        return None  # still booting (written once booted), or gone


def pool_idle_guests(config: Config) -> int:
    """How many guests the configured pool holds ready; 0 without a pool or an answer."""
    if not config.pool_socket:
        return 0
    from vmrun.control import ControlError
    from vmrun.pool import pool_status

    try:
        return int(pool_status(Path(config.pool_socket)).get("idle", 0))
    except (ControlError, ValueError, TypeError):
        return 0


# --- the collector ------------------------------------------------------------------------


@dataclass
class PodSample:
    """One running sandbox, as one scrape saw it."""

    sandbox_id: str
    record: SandboxRecord
    usage: dict[str, Usage]  # by role, summed over its processes


def sample_pods(config: Config, proc: str = "/proc") -> list[PodSample]:
    """The running sandboxes: booted (sandbox.json written) with their QEMU alive."""
    ticks = os.sysconf("SC_CLK_TCK")
    vm_root = config.vm_dir
    processes = scan_processes(f"{vm_root}/", proc)
    pods = []
    for name, sandbox in sorted(attribute(processes, vm_root).items()):
        if QEMU not in sandbox.pids:
            continue  # its helpers outlived it for a moment: the sandbox is going
        record = read_record(vm_root / name)
        if record is None:
            continue
        usage: dict[str, Usage] = {}
        for role, pids in sandbox.pids.items():
            samples = [u for u in (usage_of(pid, ticks, proc) for pid in set(pids)) if u is not None]
            if samples:
                usage[role] = Usage(sum(u.cpu_seconds for u in samples), sum(u.rss_bytes for u in samples))
        pods.append(PodSample(record.sandbox_id, record, usage))
    return pods


class PodCollector:
    """A prometheus_client collector: reads the host at each collect()."""

    def __init__(self, config: Config, proc: str = "/proc"):
        self.config = config
        self.proc = proc

    def collect(self) -> Iterator["Metric"]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pods = sample_pods(self.config, self.proc)
        yield GaugeMetricFamily("vmrun_pods", "Running sandboxes (guests), the pool's idle ones included.",
                                value=len(pods))
        cpu = CounterMetricFamily("vmrun_pod_process_cpu_seconds",
                                  "CPU time (user + system) of each host process serving a pod.",
                                  labels=["sandbox", "process"])
        rss = GaugeMetricFamily("vmrun_pod_process_rss_bytes",
                                "Resident memory of each host process serving a pod.",
                                labels=["sandbox", "process"])
        memory = GaugeMetricFamily("vmrun_pod_guest_memory_bytes",
                                   "The guest's RAM: what QEMU was given at boot plus what was hot-plugged.",
                                   labels=["sandbox"])
        start = GaugeMetricFamily("vmrun_pod_start_seconds",
                                  "Seconds from the sandbox's start to the end of each boot phase.",
                                  labels=["sandbox", "phase"])
        for pod in pods:
            for role, usage in sorted(pod.usage.items()):
                cpu.add_metric([pod.sandbox_id, role], usage.cpu_seconds)
                rss.add_metric([pod.sandbox_id, role], usage.rss_bytes)
            memory.add_metric([pod.sandbox_id], pod.record.memory_mib * _MIB)
            for phase, seconds in pod.record.timings.items():
                start.add_metric([pod.sandbox_id, phase], seconds)
        yield from (cpu, rss, memory, start)
        yield GaugeMetricFamily("vmrun_pool_idle_guests", "Pre-booted guests idle in the pool (0: no pool).",
                                value=pool_idle_guests(self.config))


# --- the server ---------------------------------------------------------------------------


def serve(config: Config, listen: str = DEFAULT_LISTEN) -> int:
    """Serve /metrics on `listen` until SIGTERM or SIGINT; 0."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)  # describing would read the host once more
    registry.register(PodCollector(config))  # type: ignore[arg-type]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenAddressError(f"monitor: cannot listen on {listen}: {reason}") from None
    log.info("serving metrics on http://%s/metrics", listen)
    try:
        while not stop.wait(1.0):  # a bounded wait: the signal handler runs between waits
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return 0
