"""The agent's gRPC service without crun or a guest: a fake crun, a fake call context, and
processes this test runner owns (the reaper is never started here, so it reaps nothing)."""

import errno
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from vmrun.agent import agent_pb2 as pb
from vmrun.agent import service
from vmrun.agent.process_streams import ProcessStreamServer
from vmrun.agent.processes import Child, Reaper
from vmrun.agent.service import AgentService, Container, GuestProcess, SharedFd
from vmrun.common.process_stream import FrameSocket, Kind, Output, attach_payload, pack_exit


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code = code


class FakeContext:
    def __init__(self) -> None:
        self.active = True
        self.callbacks: list = []

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)

    def end(self) -> None:
        """The call is over (the caller went away): gRPC runs the callbacks."""
        self.active = False
        for callback in self.callbacks:
            callback()


class FakeCrun:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, bool]] = []

    def create(self, container_id, bundle, stdio, console_socket, start=False) -> Child:
        return Child(1 << 22)  # never signalled: these tests do not kill it

    def delete(self, container_id: str, force: bool = False) -> None:
        self.deleted.append((container_id, force))


@pytest.fixture
def agent(monkeypatch, tmp_path):
    monkeypatch.setattr(service, "_WAKE_SLICE", 0.02)
    monkeypatch.setattr(service, "BUNDLES_DIR", str(tmp_path / "bundles"))
    monkeypatch.setattr(service, "CONSOLES_DIR", str(tmp_path / "consoles"))
    agent = AgentService(Reaper())
    agent._crun = FakeCrun()
    return agent


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def _add(agent: AgentService, process: GuestProcess, tmp_path: Path, container_id: str = "c1") -> None:
    bundle = tmp_path / container_id
    bundle.mkdir()
    agent._containers[container_id] = Container(container_id, bundle, process)


def _piped(child: Child) -> tuple[GuestProcess, int, int]:
    """A process with pipes for stdin and stdout: (process, stdin's reader, stdout's writer)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.close(err_w)
    process = GuestProcess(child, SharedFd(in_w, "stdin"), SharedFd(out_r, "stdout"), SharedFd(err_r, "stderr"),
                           terminal=False)
    return process, in_r, out_w


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


class StreamToAgent:
    """A host's process stream into the agent's end (agent/process_streams.py), over a
    socketpair instead of vsock."""

    def __init__(self, agent: AgentService, container_id: str = "c1"):
        host_sock, guest_sock = socket.socketpair()
        server = ProcessStreamServer(None, agent, lambda message: None)
        self.thread = threading.Thread(target=server._serve, args=(guest_sock,), daemon=True)
        self.thread.start()
        self.frames = FrameSocket(host_sock)
        self.frames.send(Kind.ATTACH, attach_payload(container_id, ""))

    def frames_until_end(self) -> list[tuple[Kind, bytes]]:
        got = []
        while (frame := self.frames.receive()) is not None:
            got.append((frame[0], bytes(frame[1])))
        return got


def test_a_stream_carries_output_until_eof_then_the_exit(agent, tmp_path, sleeper):
    process, _, out_w = _piped(Child(sleeper.pid, status=3 << 8))
    _add(agent, process, tmp_path)
    os.write(out_w, b"hello")
    os.close(out_w)
    frames = StreamToAgent(agent).frames_until_end()
    assert frames[0] == (Kind.ATTACHED, b"")
    assert b"".join(data for kind, data in frames if kind == Kind.STDOUT) == b"hello"
    assert (Kind.EXIT, pack_exit(3)) in frames
    assert sleeper.poll() is None  # it had exited (as far as the agent knew): nothing is killed


def test_the_host_vanishing_before_the_exit_kills_the_process(agent, tmp_path, sleeper):
    process, _, _ = _piped(Child(sleeper.pid))
    _add(agent, process, tmp_path)
    stream = StreamToAgent(agent)
    assert stream.frames.receive()[0] == Kind.ATTACHED
    stream.frames.close()
    stream.thread.join(10)
    assert not stream.thread.is_alive()
    assert sleeper.wait(timeout=10) == -signal.SIGKILL


def test_remove_leaves_a_held_fd_to_its_stream(agent, tmp_path, sleeper):
    process, _, out_w = _piped(Child(sleeper.pid, status=0))
    _add(agent, process, tmp_path)
    out_r = process.stdout.fd
    os.write(out_w, b"x")
    stream = StreamToAgent(agent)
    assert stream.frames.receive()[0] == Kind.ATTACHED
    # stderr's writer is closed already: its end may come before stdout's data, or after.
    kind, payload = stream.frames.receive()
    if kind == Kind.OUTPUT_END:
        assert bytes(payload) == bytes([Output.STDERR])
        kind, payload = stream.frames.receive()
    assert (kind, bytes(payload)) == (Kind.STDOUT, b"x")
    agent._remove("c1", force=True)  # the pump lets go of it within a wake slice
    frames = stream.frames_until_end()
    assert (Kind.OUTPUT_END, bytes([Output.STDOUT])) in frames
    assert not _is_open(out_r)  # let go: its number may be reused now
    os.close(out_w)


def test_stdin_through_a_stream_is_written_credited_and_closed(agent, tmp_path):
    process, in_r, out_w = _piped(Child(1 << 22))
    _add(agent, process, tmp_path)
    stream = StreamToAgent(agent)
    assert stream.frames.receive()[0] == Kind.ATTACHED
    for chunk in (b"one ", b"two ", b"three"):
        stream.frames.send(Kind.STDIN, chunk)
    stream.frames.send(Kind.STDIN_EOF)
    data = b""
    while chunk := os.read(in_r, 100):
        data += chunk
    assert data == b"one two three"  # and then EOF: stdin closed in order, after the data
    credited = 0
    while credited < len(data):
        kind, payload = stream.frames.receive()
        if kind == Kind.STDIN_CREDIT:
            credited += int.from_bytes(payload, "big")
    assert process.stdin is None
    stream.frames.close()
    os.close(in_r)
    os.close(out_w)


def test_a_stream_to_a_missing_container_is_refused(agent):
    kind, payload = StreamToAgent(agent, "nope").frames.receive()
    assert kind == Kind.REFUSED and b"does not exist" in bytes(payload)


def test_a_terminal_is_closed_once_for_stdin_and_stdout(agent, tmp_path):
    master, slave = os.openpty()
    pty = SharedFd(master, "the terminal")
    _add(agent, GuestProcess(Child(1 << 22, status=0), pty, pty, None, terminal=True), tmp_path)
    agent._remove("c1", force=True)
    assert not _is_open(master)
    os.close(slave)
    reused = os.open(os.devnull, os.O_RDONLY)  # the lowest free number: likely master's
    try:
        pty.close()  # again: a no-op, which must not close whatever took the number
        assert _is_open(reused)
    finally:
        os.close(reused)


def test_wait_process_returns_the_status_or_gives_up_on_a_cancelled_call(agent, tmp_path):
    child = Child(1 << 22)
    _add(agent, GuestProcess(child, None, None, None, False), tmp_path)
    context = FakeContext()
    context.active = False
    with pytest.raises(Aborted) as aborted:
        agent.WaitProcess(pb.ProcessRequest(container_id="c1"), context)
    assert aborted.value.code == grpc.StatusCode.CANCELLED
    child.status = 3 << 8
    response = agent.WaitProcess(pb.ProcessRequest(container_id="c1"), FakeContext())
    assert (response.exit_status, response.signal) == (3, 0)


def test_an_exited_process_is_not_signalled(agent, tmp_path, sleeper):
    # Its pid may be another process's by now: here, a living one.
    _add(agent, GuestProcess(Child(sleeper.pid, status=0), None, None, None, False), tmp_path)
    agent.SignalProcess(pb.SignalProcessRequest(container_id="c1", signal=signal.SIGKILL), FakeContext())
    assert sleeper.poll() is None


def test_a_container_whose_terminal_never_came_is_deleted(agent, monkeypatch):
    monkeypatch.setattr(service, "_CONSOLE_TIMEOUT", 0.1)
    spec = {"process": {"terminal": True}}
    request = pb.CreateContainerRequest(container_id="tty", spec_json=json.dumps(spec).encode())
    with pytest.raises(Aborted) as aborted:
        agent.CreateContainer(request, FakeContext())
    assert aborted.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert agent._crun.deleted == [("tty", True)]
    assert not (Path(service.BUNDLES_DIR) / "tty").exists()
    assert "tty" not in agent._containers


def test_specs_that_are_no_json_object_are_refused(agent):
    for text in (b"[1, 2]", b'{"process": 3}'):
        with pytest.raises(Aborted) as aborted:
            agent.CreateContainer(pb.CreateContainerRequest(container_id="bad", spec_json=text), FakeContext())
        assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not (Path(service.BUNDLES_DIR) / "bad").exists()
