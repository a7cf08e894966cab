"""vmrun monitor's pure parts: /proc parsing, --listen, which process serves which sandbox,
and the metrics a fake host (a /proc and a run dir of files) gives; no guests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmrun.config import Config
from vmrun.errors import VmrunError
from vmrun.monitor import (DAEMON, QEMU, VIRTIOFSD, VSOCK_BACKEND, PodCollector, ProcessInfo, attribute,
                           parse_listen, parse_record, parse_stat_cpu_seconds, parse_stat_ppid,
                           parse_status_rss_bytes, role_of, sample_pods, scan_processes)
from vmrun.sandbox import SANDBOX_RECORD, Sandbox, vm_dir_for

# A command name with a space and parentheses: the fields are counted after its last ")".
STAT = "4242 (qemu (x) y) S 4000 4242 4242 0 -1 4194560 3000 0 2 0 250 150 7 9 20 0 5 0 123 456 789\n"
STATUS = "Name:\tqemu\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nRssAnon:\t 1024 kB\n"


def test_stat_and_status_parsing():
    assert parse_stat_ppid(STAT) == 4000
    assert parse_stat_cpu_seconds(STAT, 100) == pytest.approx(4.0)  # utime + stime, not the children's
    assert parse_status_rss_bytes(STATUS) == 2048 * 1024
    assert parse_status_rss_bytes("Name:\tzombie\nState:\tZ (zombie)\n") == 0


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8090", ("127.0.0.1", 8090)),
    (":8090", ("0.0.0.0", 8090)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:9000", ("::1", 9000)),
    ("[::]:65535", ("::", 65535)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text, says", [
    ("8090", "is not HOST:PORT"),
    ("", "is not HOST:PORT"),
    ("127.0.0.1:", "port must be a number"),
    ("127.0.0.1:0", "port must be a number"),
    ("127.0.0.1:65536", "port must be a number"),
    ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:\u00b2", "port must be a number"),
    ("::1:80", "[ADDRESS]:PORT"),
])
def test_bad_listen_addresses_are_one_line_errors(text, says):
    with pytest.raises(VmrunError) as caught:
        parse_listen(text)
    assert says in str(caught.value) and "\n" not in str(caught.value)


VM_ROOT = Path("/run/x/vm")
A, B = "0123456789abcdef", "fedcba9876543210"


def qemu(pid: int, ppid: int, name: str, root: Path = VM_ROOT) -> ProcessInfo:
    return ProcessInfo(pid, ppid, ("/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "qemu-system-x86_64", "-name", "x",
                                   "-chardev", f"socket,id=qmp,path={root}/{name}/qmp.sock", "-mon", "chardev=qmp"))


def virtiofsd(pid: int, name: str, root: Path = VM_ROOT) -> ProcessInfo:
    return ProcessInfo(pid, 1, ("/usr/libexec/virtiofsd", f"--socket-path={root}/{name}/virtiofsd.sock",
                                f"--shared-dir={root}/{name}/shared", "--cache=auto"))


def vsock_backend(pid: int, name: str, root: Path = VM_ROOT) -> ProcessInfo:
    return ProcessInfo(pid, 1, ("/usr/bin/python3", "-S", "-m", "vmrun.hypervisor.vsock.vhost_user",
                                "--socket", f"{root}/{name}/vhost-user-vsock.sock", "--cid", "7"))


def test_roles_by_what_each_process_serves():
    assert role_of(qemu(1, 0, A).cmdline) == QEMU
    assert role_of(("/opt/my-qemu-wrapper", "-chardev", f"socket,id=qmp,path={VM_ROOT}/{A}/qmp.sock")) == QEMU
    assert role_of(virtiofsd(1, A).cmdline) == VIRTIOFSD
    # Before seccomp_exec.py execs virtiofsd, it is already virtiofsd's.
    assert role_of(("python3", "-S", "-m", "vmrun.hypervisor.seccomp_exec", "5", "/usr/libexec/virtiofsd",
                    f"--socket-path={VM_ROOT}/{A}/virtiofsd.sock")) == VIRTIOFSD
    assert role_of(vsock_backend(1, A).cmdline) == VSOCK_BACKEND
    assert role_of(("tail", "-f", f"{VM_ROOT}/{A}/qemu.log")) is None


def test_processes_attributed_to_their_sandbox_dirs():
    table = [
        qemu(100, 50, A), virtiofsd(101, A), vsock_backend(102, A),
        qemu(200, 60, B), virtiofsd(201, B),  # kernel vhost-vsock: no backend process
        ProcessInfo(300, 1, ("less", f"{VM_ROOT}/{A}/console.log")),  # names A, serves nothing
        ProcessInfo(301, 1, ("qemu-system-x86_64", "-chardev",  # another run dir's
                             f"socket,id=qmp,path=/elsewhere{VM_ROOT}/{A}/qmp.sock")),
        qemu(302, 1, "not-a-sandbox"),  # a name that is no sandbox's
    ]
    found = attribute(table, VM_ROOT)
    assert set(found) == {A, B}
    assert found[A].pids == {QEMU: [100], DAEMON: [50], VIRTIOFSD: [101], VSOCK_BACKEND: [102]}
    assert found[B].pids == {QEMU: [200], DAEMON: [60], VIRTIOFSD: [201]}


def test_a_reparented_qemu_has_no_daemon():
    assert attribute([qemu(100, 1, A)], VM_ROOT)[A].pids == {QEMU: [100]}


def test_sandbox_record_parsing():
    record = parse_record(json.dumps({"sandbox_id": "pod", "timings": {"qemu_started": 0.5}, "memory_mib": 512}))
    assert record is not None and (record.sandbox_id, record.timings, record.memory_mib) == \
        ("pod", {"qemu_started": 0.5}, 512)
    for broken in ("", "[]", "{}", '{"sandbox_id": "x", "timings": [1]}', '{"sandbox_id": "x", "memory_mib": "lots"}'):
        assert parse_record(broken) is None, broken


def test_sandbox_writes_the_record_the_monitor_reads(tmp_path):
    sandbox = Sandbox("my-pod", Config(run_dir=tmp_path / "run"))
    sandbox.dir.mkdir(parents=True)
    sandbox.timings.update(qemu_started=0.25, sandbox_created=1.5)
    sandbox._write_record(512)
    sandbox._write_record(256)  # a guest never shrinks: the largest size wins
    record = parse_record((sandbox.dir / SANDBOX_RECORD).read_text())
    assert record is not None
    assert (record.sandbox_id, record.memory_mib, record.timings) == \
        ("my-pod", 512, {"qemu_started": 0.25, "sandbox_created": 1.5})
    assert (sandbox.dir / SANDBOX_RECORD).stat().st_mode & 0o077 == 0


def _fake_process(proc: Path, pid: int, ppid: int, argv: tuple[str, ...], ticks: int, rss_kib: int) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    (entry / "stat").write_text(f"{pid} (x) S {ppid} 1 1 0 -1 0 0 0 0 0 {ticks} {ticks} 0 0 20 0 1 0 1 1 1\n")
    (entry / "status").write_text(f"Name:\tx\nVmRSS:\t{rss_kib} kB\n")


@pytest.fixture
def fake_host(tmp_path):
    """A /proc with one booted pod (its four processes), one booting (no record yet), one
    whose QEMU is gone; and the config whose run dir holds them."""
    config = Config(run_dir=tmp_path / "run")
    proc = tmp_path / "proc"
    booted = vm_dir_for(config, "pod-1")
    booting = vm_dir_for(config, "pod-2")
    dying = vm_dir_for(config, "pod-3")
    root, tick = config.vm_dir, os.sysconf("SC_CLK_TCK")
    _fake_process(proc, 10, 1, ("python3", "-m", "vmrun.sandbox_daemon", "--id", "pod-1"), tick, 30000)
    _fake_process(proc, 11, 10, qemu(11, 10, booted.name, root).cmdline, 2 * tick, 200000)
    _fake_process(proc, 12, 10, virtiofsd(12, booted.name, root).cmdline, tick // 2, 4000)
    _fake_process(proc, 13, 10, vsock_backend(13, booted.name, root).cmdline, tick // 2, 9000)
    _fake_process(proc, 21, 20, qemu(21, 20, booting.name, root).cmdline, tick, 1000)
    _fake_process(proc, 32, 1, virtiofsd(32, dying.name, root).cmdline, tick, 1000)
    (proc / "self").mkdir()  # not a pid
    for path in (booted, booting, dying):
        path.mkdir(parents=True)
    for path, name in ((booted, "pod-1"), (dying, "pod-3")):
        (path / SANDBOX_RECORD).write_text(json.dumps(
            {"sandbox_id": name, "timings": {"qemu_started": 0.5, "agent_ready": 2.0, "sandbox_created": 2.25},
             "memory_mib": 768}))
    return config, proc


def test_scan_reads_only_processes_naming_the_run_dir(fake_host):
    config, proc = fake_host
    pids = {p.pid for p in scan_processes(f"{config.vm_dir}/", str(proc))}
    assert pids == {11, 12, 13, 21, 32}


def test_only_booted_pods_with_their_qemu_are_sampled(fake_host):
    config, proc = fake_host
    pods = sample_pods(config, str(proc))
    assert [pod.sandbox_id for pod in pods] == ["pod-1"]
    usage = pods[0].usage
    assert {role: (u.cpu_seconds, u.rss_bytes) for role, u in usage.items()} == {
        QEMU: (4.0, 200000 * 1024), DAEMON: (2.0, 30000 * 1024),
        VIRTIOFSD: (pytest.approx(1.0, abs=0.02), 4000 * 1024),
        VSOCK_BACKEND: (pytest.approx(1.0, abs=0.02), 9000 * 1024)}


def test_collector_exposition(fake_host):
    config, proc = fake_host
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(config, str(proc)))
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("vmrun_pods", ())] == 1
    assert samples[("vmrun_pool_idle_guests", ())] == 0
    for role in (QEMU, VIRTIOFSD, VSOCK_BACKEND, DAEMON):
        key = (("process", role), ("sandbox", "pod-1"))
        assert samples[("vmrun_pod_process_cpu_seconds_total", key)] > 0
        assert samples[("vmrun_pod_process_rss_bytes", key)] > 0
    assert samples[("vmrun_pod_guest_memory_bytes", (("sandbox", "pod-1"),))] == 768 << 20
    assert samples[("vmrun_pod_start_seconds", (("phase", "agent_ready"), ("sandbox", "pod-1")))] == 2.0
    assert "pod-2" not in text and "pod-3" not in text
    assert "# TYPE vmrun_pod_process_cpu_seconds_total counter" in text


def test_an_unanswered_pool_counts_no_idle_guests(tmp_path):
    from vmrun.monitor import pool_idle_guests

    assert pool_idle_guests(Config(run_dir=tmp_path, pool_socket=str(tmp_path / "no-pool.sock"))) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def monitor_config(tmp_path):
    """A config whose run dir holds no sandbox (short: run_dir is at most 54 bytes)."""
    run_dir = tempfile.mkdtemp(prefix="vmrun-m", dir="/tmp")
    config = tmp_path / "vmrun.toml"
    config.write_text(f'run_dir = "{run_dir}"\n')
    yield config
    shutil.rmtree(run_dir)


def _monitor(config: Path, listen: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmrun.cli", "monitor", "--listen", listen],
                            env={**os.environ, "VMRUN_CONFIG": str(config)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _get(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_serves_until_sigterm_then_exits_0(monitor_config):
    port = _free_port()
    monitor = _monitor(monitor_config, f"127.0.0.1:{port}")
    try:
        text = _get(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 20)
        assert "vmrun_pods 0.0" in text and "vmrun_pool_idle_guests 0.0" in text
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(10) == 0
    finally:
        monitor.kill()
        monitor.wait()


def test_an_address_in_use_is_one_line(monitor_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monitor = _monitor(monitor_config, f"127.0.0.1:{port}")
        _, err = monitor.communicate(timeout=20)
    assert monitor.returncode == 1
    assert err.decode().splitlines() == [f"vmrun: monitor: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_the_documented_unit_and_scrape_config_match_the_defaults():
    import yaml

    from vmrun.monitor import DEFAULT_LISTEN

    doc = (Path(__file__).resolve().parents[2] / "docs" / "monitoring.md").read_text()
    blocks = dict(re.findall(r"^```(\w+)\n(.*?)^```$", doc, re.M | re.S)[::-1])  # the first of each language
    assert f"ExecStart=/usr/local/bin/vmrun monitor --listen {DEFAULT_LISTEN}\n" in blocks["ini"]
    assert "Restart=on-failure\n" in blocks["ini"]
    scrape = yaml.safe_load(blocks["yaml"])["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [DEFAULT_LISTEN]


def test_the_cli_defaults_to_the_monitors_address():
    from vmrun.cli import build_parser, cmd_monitor
    from vmrun.monitor import DEFAULT_LISTEN

    args = build_parser().parse_args(["monitor"])
    assert (args.handler, args.listen) == (cmd_monitor, DEFAULT_LISTEN)
