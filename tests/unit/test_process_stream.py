"""The process stream (vmrun/common/process_stream.py): its framing, the host's relay
(vmrun/stdio.py) against a scripted guest, and the guest's end (vmrun/agent/process_streams.py)
over real pipes, each side treating the other's frames as untrusted."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from vmrun.agent.processes import Child
from vmrun.agent.process_streams import ProcessStream as GuestEnd
from vmrun.agent.service import GuestProcess, SharedFd
from vmrun.common.process_stream import (MAX_FRAME, STDIN_WINDOW, FrameSocket, Kind, Output, StreamError,
                                         attach_payload, pack_exit, pack_size, pack_u32, parse_attach)
from vmrun.errors import AgentError
from vmrun.stdio import ProcessStream as HostEnd


def pair() -> tuple[FrameSocket, FrameSocket]:
    a, b = socket.socketpair()
    return FrameSocket(a), FrameSocket(b)


# ---- framing ----

def test_frames_round_trip_whatever_their_size():
    left, right = pair()
    payloads = [b"", b"x", os.urandom(5000), os.urandom(MAX_FRAME)]

    def send_all():
        for payload in payloads:
            left.send(Kind.STDOUT, payload)
        left.sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=send_all).start()
    for payload in payloads:
        kind, got = right.receive()
        assert kind == Kind.STDOUT and bytes(got) == payload
    assert right.receive() is None


@pytest.mark.parametrize("raw, why", [
    (struct.pack(">BI", Kind.STDOUT, MAX_FRAME + 1), "frame of"),
    (struct.pack(">BI", 99, 0), "unknown frame kind"),
    (struct.pack(">BI", Kind.STDOUT, 10) + b"short", "inside a frame"),
    (b"\x12\x00", "inside a frame"),
])
def test_a_broken_frame_ends_the_stream(raw, why):
    a, b = socket.socketpair()
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(StreamError, match=why):
        FrameSocket(b).receive()


def test_a_frame_over_the_limit_is_not_sent():
    left, _ = pair()
    with pytest.raises(ValueError):
        left.send(Kind.STDIN, bytes(MAX_FRAME + 1))


@pytest.mark.parametrize("payload", [b"{}", b"[]", b"not json", b'{"container": 3}', b"x" * 5000])
def test_attach_requests_are_checked(payload):
    with pytest.raises(StreamError):
        parse_attach(memoryview(payload))
    assert parse_attach(memoryview(attach_payload("c1", "e1"))) == ("c1", "e1")


# ---- the host's end, against a scripted guest ----

class ScriptedGuest:
    """The guest's side of a stream, played by the test."""

    def __init__(self):
        host_sock, guest_sock = socket.socketpair()
        self.host = HostEnd(host_sock, "c1", "e1")
        self.frames = FrameSocket(guest_sock)

    def attach(self):
        result = {}

        def answer():
            kind, payload = self.frames.receive()
            result["attach"] = (kind, bytes(payload))
            self.frames.send(Kind.ATTACHED)

        thread = threading.Thread(target=answer)
        thread.start()
        self.host.attach()
        thread.join()
        return result["attach"]

    def end(self):
        self.frames.sock.shutdown(socket.SHUT_RDWR)


def relay_in_thread(host: HostEnd, **fds):
    result = {}

    def run():
        try:
            result["code"] = host.relay(**fds)
        except AgentError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_the_host_relays_output_and_returns_the_exit_status():
    guest = ScriptedGuest()
    assert guest.attach() == (Kind.ATTACH, attach_payload("c1", "e1"))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    thread, result = relay_in_thread(guest.host, stdin=None, stdout=out_w, stderr=err_w, terminal=False)
    guest.frames.send(Kind.STDOUT, b"hello ")
    guest.frames.send(Kind.STDERR, b"oops")
    guest.frames.send(Kind.STDOUT, b"world")
    guest.frames.send(Kind.EXIT, pack_exit(3))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDOUT]))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDERR]))
    guest.end()
    thread.join(5)
    assert result == {"code": 3}
    os.close(out_w)
    os.close(err_w)
    assert os.read(out_r, 100) == b"hello world" and os.read(err_r, 100) == b"oops"


def test_a_reset_after_the_exit_and_every_output_end_is_no_error():
    # A process that never reads its stdin: the guest closes with that stdin unread, and
    # the host's socket reads a reset (ECONNRESET) where it would have read the end.
    guest = ScriptedGuest()
    guest.attach()
    null = os.open(os.devnull, os.O_WRONLY)
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"never read")
    os.close(stdin_w)
    thread, result = relay_in_thread(guest.host, stdin=stdin_r, stdout=null, stderr=null, terminal=False)
    assert guest.frames.receive()[0] == Kind.STDIN  # now unread in the guest's socket
    guest.frames.send(Kind.EXIT, pack_exit(0))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDOUT]))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDERR]))
    time.sleep(0.2)  # the relay's STDIN_EOF lands, unread, in the guest's socket
    guest.frames.close()
    thread.join(5)
    os.close(null)
    os.close(stdin_r)
    assert result == {"code": 0}


@pytest.mark.parametrize("script", [
    [],  # the guest went before the exit
    [(Kind.EXIT, pack_exit(0))],  # an output never ended
    [(Kind.ATTACH, b"")],  # not the guest's to send
    [(Kind.OUTPUT_END, b"\x07")],  # no such output
])
def test_a_stream_that_ends_early_or_breaks_the_protocol_is_an_agent_error(script):
    guest = ScriptedGuest()
    guest.attach()
    null = os.open(os.devnull, os.O_WRONLY)
    thread, result = relay_in_thread(guest.host, stdin=None, stdout=null, stderr=null, terminal=False)
    for kind, payload in script:
        guest.frames.send(kind, payload)
    guest.end()
    thread.join(5)
    os.close(null)
    assert "error" in result, result


def test_a_refused_attach_says_why():
    guest = ScriptedGuest()

    def refuse():
        guest.frames.receive()
        guest.frames.send(Kind.REFUSED, b"container 'c1' does not exist")

    threading.Thread(target=refuse).start()
    with pytest.raises(AgentError, match="does not exist"):
        guest.host.attach()


def test_the_host_sends_stdin_only_within_the_credit_granted():
    guest = ScriptedGuest()
    guest.attach()
    in_r, in_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    total = STDIN_WINDOW + 3 * MAX_FRAME
    writer = threading.Thread(target=_write_and_close, args=(in_w, bytes(total)))
    writer.start()
    thread, result = relay_in_thread(guest.host, stdin=in_r, stdout=null, stderr=null, terminal=False)
    received = 0
    guest.frames.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):  # the whole window, then nothing until credit comes
        while True:
            kind, payload = guest.frames.receive()
            assert kind == Kind.STDIN
            received += len(payload)
    assert received == STDIN_WINDOW
    guest.frames.sock.settimeout(5.0)
    guest.frames.send(Kind.STDIN_CREDIT, pack_u32(received))
    while True:
        kind, payload = guest.frames.receive()
        if kind == Kind.STDIN_EOF:
            break
        received += len(payload)
        guest.frames.send(Kind.STDIN_CREDIT, pack_u32(len(payload)))
    assert received == total
    guest.frames.send(Kind.EXIT, pack_exit(0))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDOUT]))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDERR]))
    guest.end()
    thread.join(5)
    writer.join(5)
    os.close(null)
    assert result == {"code": 0}


def _write_and_close(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def test_the_host_closes_an_output_whose_reader_went_and_still_waits_for_the_exit():
    guest = ScriptedGuest()
    guest.attach()
    out_r, out_w = os.pipe()
    os.close(out_r)  # `| head -1` gone
    null = os.open(os.devnull, os.O_WRONLY)
    thread, result = relay_in_thread(guest.host, stdin=None, stdout=out_w, stderr=null, terminal=False)
    guest.frames.send(Kind.STDOUT, b"lost")
    kind, payload = guest.frames.receive()
    assert (kind, bytes(payload)) == (Kind.CLOSE_OUTPUT, bytes([Output.STDOUT]))
    guest.frames.send(Kind.STDOUT, b"dropped")
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDOUT]))
    guest.frames.send(Kind.OUTPUT_END, bytes([Output.STDERR]))
    guest.frames.send(Kind.EXIT, pack_exit(141))
    guest.end()
    thread.join(5)
    os.close(out_w)
    os.close(null)
    assert result == {"code": 141}


def test_signals_and_sizes_reach_the_guest_as_frames():
    guest = ScriptedGuest()
    guest.attach()
    guest.host.signal(15)
    guest.host.resize(40, 120)
    assert guest.frames.receive()[0] == Kind.SIGNAL
    kind, payload = guest.frames.receive()
    assert kind == Kind.RESIZE and bytes(payload) == pack_size(40, 120)


# ---- the guest's end, over real pipes ----

class FakeService:
    """What the guest's end needs of the agent: exit codes and signals, for one fake child."""

    def __init__(self):
        self.code: int | None = None
        self.signals: list[int] = []
        self.exited = threading.Event()

    def exit_code(self, process, timeout):
        self.exited.wait(timeout)
        return self.code

    def kill(self, process, signum):
        self.signals.append(signum)
        if signum == 9:  # it dies of it
            self.code = 137
            self.exited.set()


def guest_process():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    process = GuestProcess(Child(os.getpid()), SharedFd(in_w, "stdin"), SharedFd(out_r, "stdout"),
                           SharedFd(err_r, "stderr"), terminal=False)
    return process, (in_r, out_w, err_w)


def serve_guest(process, service):
    host_sock, guest_sock = socket.socketpair()
    end = GuestEnd(FrameSocket(guest_sock), process, service)
    thread = threading.Thread(target=lambda: _run_ignoring_stream_errors(end))
    thread.start()
    host = FrameSocket(host_sock)
    assert host.receive()[0] == Kind.ATTACHED
    return host, thread


def _run_ignoring_stream_errors(end):
    try:
        end.run()
    except (StreamError, OSError):
        pass


def test_the_guest_sends_output_then_the_exit_then_closes():
    process, (in_r, out_w, err_w) = guest_process()
    service = FakeService()
    host, thread = serve_guest(process, service)
    os.write(out_w, b"out")
    os.write(err_w, b"err")
    os.close(out_w)
    os.close(err_w)
    service.code = 7
    service.exited.set()
    frames = []
    while (frame := host.receive()) is not None:
        frames.append((frame[0], bytes(frame[1])))
    thread.join(5)
    assert (Kind.STDOUT, b"out") in frames and (Kind.STDERR, b"err") in frames
    assert (Kind.EXIT, pack_exit(7)) in frames
    assert {payload for kind, payload in frames if kind == Kind.OUTPUT_END} == {b"\x01", b"\x02"}
    assert service.signals == []  # it exited: nothing to kill
    os.close(in_r)


def test_the_guest_writes_stdin_credits_it_and_closes_it_at_eof():
    process, (in_r, out_w, err_w) = guest_process()
    service = FakeService()
    host, thread = serve_guest(process, service)
    host.send(Kind.STDIN, b"abc")
    host.send(Kind.STDIN, b"def")
    host.send(Kind.STDIN_EOF)
    assert os.read(in_r, 10) in (b"abc", b"abcdef")
    credits = 0
    while credits < 6:
        kind, payload = host.receive()
        assert kind == Kind.STDIN_CREDIT
        credits += struct.unpack(">I", payload)[0]
    deadline = time.monotonic() + 5
    while os.read(in_r, 10) and time.monotonic() < deadline:  # the rest, then EOF: stdin closed
        pass
    host.close()
    thread.join(5)
    assert service.signals == [9]  # the host went before the exit: the process goes too
    for fd in (in_r, out_w, err_w):
        os.close(fd)


def test_the_guest_kills_the_process_when_the_host_goes():
    process, fds = guest_process()
    service = FakeService()
    host, thread = serve_guest(process, service)
    host.close()
    thread.join(5)
    assert not thread.is_alive() and service.signals == [9]
    for fd in fds:
        os.close(fd)


def test_the_guest_ends_a_stream_that_sends_stdin_beyond_its_credit():
    process, fds = guest_process()
    service = FakeService()
    host, thread = serve_guest(process, service)
    for _ in range(STDIN_WINDOW // MAX_FRAME + 1):  # nobody reads the process's stdin
        host.send(Kind.STDIN, bytes(MAX_FRAME))
    thread.join(5)
    assert not thread.is_alive() and service.signals == [9]
    for fd in fds:
        os.close(fd)


def test_the_guest_refuses_guest_side_frames_from_the_host_and_forwards_signals():
    process, fds = guest_process()
    service = FakeService()
    host, thread = serve_guest(process, service)
    host.send(Kind.SIGNAL, pack_u32(15))
    host.send(Kind.SIGNAL, pack_u32(10_000))  # no such signal: ignored
    host.send(Kind.EXIT, pack_exit(0))  # the guest's to send: the stream ends
    thread.join(5)
    assert not thread.is_alive() and service.signals == [15, 9]
    for fd in fds:
        os.close(fd)


def test_an_output_closed_before_the_attach_is_said_to_have_ended_at_once():
    process, (in_r, out_w, err_w) = guest_process()
    process.stderr.close()  # e.g. an earlier host reader went away (CLOSE_OUTPUT)
    service = FakeService()
    host, thread = serve_guest(process, service)
    kind, payload = host.receive()
    assert (kind, bytes(payload)) == (Kind.OUTPUT_END, bytes([Output.STDERR]))
    os.close(out_w)
    service.code = 0
    service.exited.set()
    frames = []
    while (frame := host.receive()) is not None:
        frames.append((frame[0], bytes(frame[1])))
    thread.join(5)
    assert (Kind.OUTPUT_END, bytes([Output.STDOUT])) in frames and (Kind.EXIT, pack_exit(0)) in frames
    for fd in (in_r, err_w):
        os.close(fd)
