"""The shim v2's pure parts: flags as containerd passes them, socket addresses, statistics as
cgroups v2 Metrics, task IO to FIFOs, files and logging binaries, rootfs mounts."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from vmrun.agent import agent_pb2 as pb
from vmrun.common.bridge import read_line
from vmrun.common.process_stream import PROCESS_STREAM_PORT, FrameSocket, Kind, Output, pack_exit, pack_u32
from vmrun.config import Config
from vmrun.errors import VmrunError
from vmrun.mounts import outermost_mounts_under
from vmrun.shimv2.main import _parse, socket_path
from vmrun.shimv2.metrics import metrics_from_stats
from vmrun.shimv2.rootfs import RootfsMount, mount_rootfs, unmount_rootfs
from vmrun.shimv2.task_io import IOPaths, ProcessIO


def test_flags_as_containerd_passes_them():
    args = _parse(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/usr/bin/containerd",
                   "-id", "abc", "-debug", "start"])
    assert (args.namespace, args.address, args.publish_binary, args.id, args.debug, args.action) == \
        ("k8s.io", "/run/c.sock", "/usr/bin/containerd", "abc", True, "start")
    args = _parse(["-namespace=default", "-id=x", "-bundle", "/b", "delete"])
    assert (args.namespace, args.id, args.bundle, args.action) == ("default", "x", "/b", "delete")
    assert _parse(["-id", "x"]).action == ""  # serve


def test_one_socket_per_containerd_namespace_and_pod(tmp_path):
    config = Config(run_dir=tmp_path / "run")
    path = socket_path(config, "/run/containerd/containerd.sock", "k8s.io", "pod1")
    assert path == socket_path(config, "/run/containerd/containerd.sock", "k8s.io", "pod1")
    assert path != socket_path(config, "/run/containerd/containerd.sock", "default", "pod1")
    assert path != socket_path(config, "/run/containerd/containerd.sock", "k8s.io", "pod2")
    assert path.parent == tmp_path / "run" / "shimv2" and len(path.name) < 40


def test_statistics_become_cgroups_v2_metrics():
    detail = {"cpu": {"usage_usec": 1500, "user_usec": 1000, "system_usec": 500, "nr_throttled": 2},
              "memory": {"anon": 4096, "file": 8192, "pgfault": 7, "not_a_field": 1},
              "memory_current": 70 << 20, "memory_max": 128 << 20, "pids_current": 3, "pids_max": 0,
              "swap_current": 0, "swap_max": 0, "memory_events": {"oom": 1, "oom_kill": 1, "max": 5},
              "io": [{"major": 254, "minor": 0, "rbytes": 100, "wbytes": 200, "rios": 1, "wios": 2, "dbytes": 0}]}
    stats = pb.StatsContainerResponse(cpu_usage_ns=1_500_000, memory_usage_bytes=70 << 20,
                                      memory_limit_bytes=128 << 20, pids_current=3,
                                      cgroup_stats_json=json.dumps(detail).encode())
    metrics = metrics_from_stats(stats)
    assert metrics.memory.usage == 70 << 20 and metrics.memory.usage_limit == 128 << 20
    assert metrics.memory.anon == 4096 and metrics.memory.file == 8192 and metrics.memory.pgfault == 7
    assert metrics.cpu.usage_usec == 1500 and metrics.cpu.user_usec == 1000 and metrics.cpu.nr_throttled == 2
    assert metrics.pids.current == 3 and metrics.pids.limit == 2**64 - 1  # "max"
    assert metrics.memory.swap_limit == 2**64 - 1
    assert (metrics.memory_events.oom, metrics.memory_events.oom_kill, metrics.memory_events.max) == (1, 1, 5)
    [device] = metrics.io.usage
    assert (device.major, device.rbytes, device.wbytes, device.wios) == (254, 100, 200, 2)


def test_no_memory_limit_reads_as_unlimited():
    metrics = metrics_from_stats(pb.StatsContainerResponse(memory_usage_bytes=1, cgroup_stats_json=b"{}"))
    assert metrics.memory.usage_limit == 2**64 - 1


class FakeGuest:
    """A guest's process stream behind a hybrid vsock socket: output to hand out, stdin
    received (credited back). The exit comes at once, or once stdin is closed."""

    def __init__(self, where: Path, stdout: list[bytes] = (), stderr: list[bytes] = (),
                 exit_after_stdin: bool = False):
        self._output = [(Kind.STDOUT, data) for data in stdout] + [(Kind.STDERR, data) for data in stderr]
        self._exit_after_stdin = exit_after_stdin
        self.stdin = b""
        self.stdin_closed = threading.Event()
        path = where / "vsock.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self.address = f"hybrid:{path}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        assert read_line(conn, 64) == f"CONNECT {PROCESS_STREAM_PORT}\n".encode()
        conn.sendall(b"OK 1\n")
        frames = FrameSocket(conn)
        assert frames.receive()[0] == Kind.ATTACH
        frames.send(Kind.ATTACHED)
        for kind, data in self._output:
            frames.send(kind, data)
        frames.send(Kind.OUTPUT_END, bytes([Output.STDOUT]))
        frames.send(Kind.OUTPUT_END, bytes([Output.STDERR]))
        if not self._exit_after_stdin:
            frames.send(Kind.EXIT, pack_exit(0))
            conn.shutdown(socket.SHUT_RDWR)  # all said, as the agent does
        while (frame := frames.receive()) is not None:
            kind, payload = frame
            if kind == Kind.STDIN:
                self.stdin += bytes(payload)
                frames.send(Kind.STDIN_CREDIT, pack_u32(len(payload)))
            elif kind == Kind.STDIN_EOF:
                self.stdin_closed.set()
                if self._exit_after_stdin:
                    frames.send(Kind.EXIT, pack_exit(0))
                    conn.shutdown(socket.SHUT_RDWR)


def test_output_to_fifos_ends_in_eof_for_containerd(tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    os.mkfifo(out)
    os.mkfifo(err)
    guest = FakeGuest(tmp_path, [b"hello ", b"world"], [b"oops"])
    io = ProcessIO(guest.address, "c", "", IOPaths(stdout=str(out), stderr=str(err)))
    try:
        io.start()  # no reader yet: it does not wait for one
        reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        data, deadline = b"", time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = os.read(reader, 100)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                break  # EOF: the shim's writer closed once the output ended (CRI's ExecSync waits for it)
            data += chunk
        assert data == b"hello world" and time.monotonic() < deadline
        os.close(reader)
    finally:
        io.close()


def test_output_to_a_file_uri_appends(tmp_path):
    log = tmp_path / "logs" / "c.log"
    io = ProcessIO(FakeGuest(tmp_path, [b"one\n"], [b"two\n"]).address, "c", "",
                   IOPaths(stdout=f"file://{log}", stderr=f"file://{log}")).start()
    io.wait_output()
    io.close()
    assert sorted(log.read_text().splitlines()) == ["one", "two"]


def test_a_regular_file_named_as_a_fifo_is_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(VmrunError, match="is not a FIFO"):
        ProcessIO(FakeGuest(tmp_path).address, "c", "", IOPaths(stdout=str(plain))).start()


def test_a_logging_binary_gets_stdout_and_stderr_as_fds_3_and_4(tmp_path):
    logger = tmp_path / "logger.sh"
    captured = tmp_path / "captured"
    # Ready at once (closes fd 5), then copies fd 3 and fd 4; its args are the URI's query.
    logger.write_text(f'#!/bin/sh\nexec 5>&-\necho "args:$*" > {captured}\ncat <&3 >> {captured}\n'
                      f'cat <&4 >> {captured}\n')
    logger.chmod(0o755)
    io = ProcessIO(FakeGuest(tmp_path, [b"out-line\n"], [b"err-line\n"]).address, "c", "",
                   IOPaths(stdout=f"binary://{logger}?tag=web", stderr=f"binary://{logger}?tag=web")).start()
    io.wait_output()
    io.close()  # closes our ends: the logger sees EOF and exits
    assert captured.read_text().splitlines() == ["args:tag=web", "out-line", "err-line"]


def test_stdin_is_pumped_until_containerd_closes_it(tmp_path):
    stdin = tmp_path / "in"
    os.mkfifo(stdin)
    agent = FakeGuest(tmp_path, exit_after_stdin=True)
    io = ProcessIO(agent.address, "c", "", IOPaths(stdin=str(stdin))).start()
    try:
        writer = os.open(stdin, os.O_WRONLY)
        os.write(writer, b"typed\n")
        os.close(writer)  # ctr's stdin reached its end
        assert agent.stdin_closed.wait(5)
        assert agent.stdin == b"typed\n"
    finally:
        io.close()


def test_close_io_with_no_writer_ever_does_not_hang(tmp_path):
    stdin = tmp_path / "in"
    os.mkfifo(stdin)
    agent = FakeGuest(tmp_path, exit_after_stdin=True)
    io = ProcessIO(agent.address, "c", "", IOPaths(stdin=str(stdin))).start()
    started = time.monotonic()
    io.close_stdin()
    assert agent.stdin_closed.wait(5) and time.monotonic() - started < 5
    io.close()


def test_rootfs_bind_mount_and_unmount(tmp_path):
    source = tmp_path / "layer"
    (source / "bin").mkdir(parents=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert mount_rootfs(bundle, [RootfsMount("bind", str(source), ("rbind", "ro"))])
    try:
        assert (bundle / "rootfs" / "bin").is_dir()
        assert outermost_mounts_under(bundle)
    finally:
        unmount_rootfs(bundle)
    assert not outermost_mounts_under(bundle)
    assert stat.S_IMODE((bundle / "rootfs").stat().st_mode) == 0o711


def test_an_unknown_rootfs_mount_type_is_refused_in_one_line(tmp_path):
    with pytest.raises(VmrunError, match="mount type 'nfs' is not supported"):
        mount_rootfs(tmp_path, [RootfsMount("nfs", "server:/x", ())])
    assert not outermost_mounts_under(tmp_path)
