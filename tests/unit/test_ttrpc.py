"""ttrpc over real unix sockets: framing, status mapping, multiplexing, limits, shutdown."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from vmrun.errors import VmrunError
from vmrun.shimv2 import ttrpc
from vmrun.shimv2.ttrpc import TtrpcClient, TtrpcError, TtrpcServer
from vmrun.shimv2.ttrpc_pb2 import KeyValue, Request, Response

HEADER = struct.Struct(">IIBB")
SERVICE = "test.v1.Things"


def _ttrpc_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("ttrpc-")]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test must leave no ttrpc thread and no socket behind."""
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + 2
    while (_ttrpc_threads() or _open_fds() - fds_before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _ttrpc_threads() == []
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - fds_before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert leaked == {}


class Things:
    """Handlers for the tests; `block` waits until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def echo(self, payload: bytes) -> bytes:
        request = KeyValue.FromString(payload)
        return KeyValue(key=request.key, value=request.value.upper()).SerializeToString()

    def missing(self, payload: bytes) -> bytes:
        raise TtrpcError(ttrpc.NOT_FOUND, "container abc: not found")

    def crash(self, payload: bytes) -> bytes:
        raise ValueError("boom\nand a second line")

    def block(self, payload: bytes) -> bytes:
        self.entered.set()
        self.release.wait(5)
        return payload

    def services(self) -> dict[str, dict[str, ttrpc.Handler]]:
        return {SERVICE: {"Echo": self.echo, "Missing": self.missing, "Crash": self.crash, "Block": self.block}}


@pytest.fixture
def things():
    handlers = Things()
    yield handlers
    handlers.release.set()  # never leave a handler blocked past its test


@pytest.fixture
def serve(tmp_path, things):
    """Starts a server on a fresh socket; returns its path (and the server)."""
    servers: list[TtrpcServer] = []

    def start(**options) -> tuple[str, TtrpcServer]:
        path = str(tmp_path / f"t{len(servers)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        server = TtrpcServer(listener, things.services(), **options).start()
        servers.append(server)
        return path, server

    yield start
    for server in servers:
        server.close()


def echo(client: TtrpcClient, key: str, value: str, **options) -> KeyValue:
    return KeyValue.FromString(client.call(SERVICE, "Echo", KeyValue(key=key, value=value).SerializeToString(),
                                           **options))


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(path)
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[tuple[int, int, int, int], bytes]:
    header = HEADER.unpack(read_exactly(sock, HEADER.size))
    return header, read_exactly(sock, header[0])


def request_frame(stream_id: int, request: Request) -> bytes:
    body = request.SerializeToString()
    return HEADER.pack(len(body), stream_id, 1, 0) + body


def test_round_trip(serve):
    path, _ = serve()
    with TtrpcClient(path) as client:
        for number in range(3):
            assert echo(client, f"k{number}", "hello") == KeyValue(key=f"k{number}", value="HELLO")
        assert echo(client, "", "", timeout=2) == KeyValue()


def test_handler_error_keeps_its_code_and_message(serve):
    path, _ = serve()
    with TtrpcClient(path) as client:
        with pytest.raises(TtrpcError) as caught:
            client.call(SERVICE, "Missing", b"")
    assert caught.value.code == ttrpc.NOT_FOUND
    assert caught.value.message == "container abc: not found"
    assert str(caught.value) == "ttrpc: container abc: not found (code 5)"
    assert isinstance(caught.value, VmrunError)


def test_unexpected_exception_is_internal_with_one_line(serve, caplog):
    path, _ = serve()
    with TtrpcClient(path) as client:
        with pytest.raises(TtrpcError) as caught:
            client.call(SERVICE, "Crash", b"")
        assert echo(client, "still", "works").value == "WORKS"
    assert caught.value.code == ttrpc.INTERNAL
    assert caught.value.message == "ValueError: boom"
    assert any(record.name == "vmrun.ttrpc" and record.exc_info for record in caplog.records)


@pytest.mark.parametrize("service, method", [(SERVICE, "Nope"), ("test.v1.Other", "Echo")])
def test_unknown_method_or_service_is_unimplemented(serve, service, method):
    path, _ = serve()
    with TtrpcClient(path) as client:
        with pytest.raises(TtrpcError) as caught:
            client.call(service, method, b"")
    assert caught.value.code == ttrpc.UNIMPLEMENTED
    assert caught.value.message == f"{service}/{method} is not implemented"


def test_calls_are_multiplexed_while_one_blocks(serve, things):
    path, _ = serve()
    with TtrpcClient(path) as client:
        blocked: dict[str, bytes] = {}
        waiter = threading.Thread(target=lambda: blocked.update(result=client.call(SERVICE, "Block", b"wait")))
        waiter.start()
        assert things.entered.wait(2)

        results: list[KeyValue] = []
        errors: list[BaseException] = []

        def many(worker: int) -> None:
            try:
                for number in range(10):
                    results.append(echo(client, f"{worker}-{number}", "x"))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        workers = [threading.Thread(target=many, args=(worker,)) for worker in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(5)
        assert errors == []
        assert sorted(result.key for result in results) == sorted(f"{w}-{n}" for w in range(4) for n in range(10))
        assert waiter.is_alive() and "result" not in blocked  # still waiting, on the same connection

        things.release.set()
        waiter.join(2)
        assert blocked == {"result": b"wait"}


def test_client_timeout_is_deadline_exceeded_and_the_late_answer_is_dropped(serve, things):
    path, _ = serve()
    with TtrpcClient(path) as client:
        started = time.monotonic()
        with pytest.raises(TtrpcError) as caught:
            client.call(SERVICE, "Block", b"", timeout=0.2)
        assert caught.value.code == ttrpc.DEADLINE_EXCEEDED
        assert 0.2 <= time.monotonic() - started < 2
        things.release.set()  # its answer now arrives for a stream nobody awaits
        assert echo(client, "after", "timeout").value == "TIMEOUT"


def test_too_many_requests_in_flight_are_refused(serve, things):
    path, _ = serve(max_in_flight=2)
    with TtrpcClient(path) as client:
        waiters = [threading.Thread(target=client.call, args=(SERVICE, "Block", b"")) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        assert things.entered.wait(2)
        deadline = time.monotonic() + 2
        while len([name for name in _ttrpc_threads() if name.startswith("ttrpc-handler-")]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(TtrpcError) as caught:
            echo(client, "third", "call")
        assert caught.value.code == ttrpc.RESOURCE_EXHAUSTED
        things.release.set()
        for waiter in waiters:
            waiter.join(2)
        assert echo(client, "free", "again").value == "AGAIN"


def test_oversized_frame_is_refused_and_the_connection_lives_on(serve):
    path, _ = serve()
    with raw_connect(path) as sock:
        size = 5 << 20
        sock.sendall(HEADER.pack(size, 1, 1, 0))
        sock.sendall(b"\0" * size)
        header, body = read_frame(sock)
        assert header[1:] == (1, 2, 0)
        status = Response.FromString(body).status
        assert status.code == ttrpc.RESOURCE_EXHAUSTED
        assert str(size) in status.message

        request = Request(service=SERVICE, method="Echo", payload=KeyValue(key="k", value="v").SerializeToString())
        sock.sendall(request_frame(3, request))
        header, body = read_frame(sock)
        assert header[1] == 3
        assert KeyValue.FromString(Response.FromString(body).payload) == KeyValue(key="k", value="V")


def test_even_stream_id_is_invalid_argument(serve):
    path, _ = serve()
    with raw_connect(path) as sock:
        sock.sendall(request_frame(2, Request(service=SERVICE, method="Echo")))
        header, body = read_frame(sock)
        assert header[1] == 2
        assert Response.FromString(body).status.code == ttrpc.INVALID_ARGUMENT


def test_garbage_request_closes_only_that_connection(serve):
    path, _ = serve()
    with TtrpcClient(path) as bystander, raw_connect(path) as sock:
        garbage = b"\xff\xff\xff\xff"  # wire type 7 does not exist: not a protobuf
        sock.sendall(HEADER.pack(len(garbage), 1, 1, 0) + garbage)
        assert sock.recv(1) == b""  # closed by the server, unanswered
        assert echo(bystander, "by", "stander").value == "STANDER"
        with TtrpcClient(path) as newcomer:
            assert echo(newcomer, "new", "comer").value == "COMER"


def test_truncated_frame_closes_the_connection(serve):
    path, _ = serve()
    with raw_connect(path) as sock:
        sock.sendall(HEADER.pack(100, 1, 1, 0) + b"short")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    with TtrpcClient(path) as client:
        assert echo(client, "k", "ok").value == "OK"


def test_server_close_fails_pending_calls_and_leaves_no_threads(serve, things):
    path, server = serve()
    client = TtrpcClient(path)
    try:
        outcome: dict[str, BaseException] = {}

        def pending_call() -> None:
            try:
                client.call(SERVICE, "Block", b"")
            except TtrpcError as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=pending_call)
        waiter.start()
        assert things.entered.wait(2)
        closer = threading.Thread(target=server.close)
        closer.start()
        waiter.join(2)
        assert isinstance(outcome.get("error"), TtrpcError)
        assert outcome["error"].code == ttrpc.UNAVAILABLE
        with pytest.raises(TtrpcError) as caught:
            echo(client, "after", "close")
        assert caught.value.code == ttrpc.UNAVAILABLE

        things.release.set()  # close() waits for the handler it could not interrupt
        closer.join(3)
        assert not closer.is_alive()
        server.close()  # idempotent
        assert [name for name in _ttrpc_threads() if name != "ttrpc-client-reader"] == []
    finally:
        client.close()
    with pytest.raises(TtrpcError) as caught:
        TtrpcClient(path, timeout=1)
    assert caught.value.code == ttrpc.UNAVAILABLE


def test_server_answers_with_exact_frames(serve):
    """The server's bytes: a 10-byte big-endian header (length, stream id, type 2, flags 0),
    then the Response protobuf, its status left out on success as Go's server does."""
    path, _ = serve()
    with raw_connect(path) as sock:
        payload = KeyValue(key="k", value="v").SerializeToString()
        sock.sendall(request_frame(7, Request(service=SERVICE, method="Echo", payload=payload)))
        expected_body = Response(payload=KeyValue(key="k", value="V").SerializeToString()).SerializeToString()
        assert read_exactly(sock, HEADER.size + len(expected_body)) == (
            struct.pack(">IIBB", len(expected_body), 7, 2, 0) + expected_body)

        sock.sendall(request_frame(9, Request(service=SERVICE, method="Missing")))
        header, body = read_frame(sock)
        assert header == (len(body), 9, 2, 0)
        assert Response.FromString(body).status.code == ttrpc.NOT_FOUND


def test_client_sends_exact_frames(tmp_path):
    """The client's bytes, seen by a hand-written server: odd stream ids from 1, the header
    big-endian with type 1 and flags 0, timeout_nano set from the call's timeout."""
    path = str(tmp_path / "raw.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        with TtrpcClient(path) as client:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2)
                results: dict[int, bytes] = {}
                callers = [
                    threading.Thread(target=lambda: results.update({1: client.call("svc", "A", b"one", timeout=3)})),
                ]
                callers[0].start()
                header = HEADER.unpack(read_exactly(conn, HEADER.size))
                assert header[1:] == (1, 1, 0)
                request = Request.FromString(read_exactly(conn, header[0]))
                assert (request.service, request.method, request.payload) == ("svc", "A", b"one")
                assert request.timeout_nano == 3_000_000_000

                callers.append(threading.Thread(target=lambda: results.update({3: client.call("svc", "B", b"two")})))
                callers[1].start()
                header, body = read_frame(conn)
                assert header[1:] == (3, 1, 0)
                assert Request.FromString(body).timeout_nano == 0

                # Answer out of order: the client routes by stream id.
                for stream_id, answer in ((3, b"second"), (1, b"first")):
                    body = Response(payload=answer).SerializeToString()
                    conn.sendall(struct.pack(">IIBB", len(body), stream_id, 2, 0) + body)
                for caller in callers:
                    caller.join(2)
                assert results == {1: b"first", 3: b"second"}


def test_a_handler_may_close_its_own_server(tmp_path):
    """A Shutdown-like method that closes the server must not deadlock on joining itself."""
    path = str(tmp_path / "self.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    servers: list[TtrpcServer] = []

    def shutdown(payload: bytes) -> bytes:
        servers[0].close()
        return b""

    servers.append(TtrpcServer(listener, {SERVICE: {"Shutdown": shutdown}}).start())
    with TtrpcClient(path) as client:
        with pytest.raises(TtrpcError) as caught:
            client.call(SERVICE, "Shutdown", b"", timeout=3)
    assert caught.value.code == ttrpc.UNAVAILABLE  # closed before it could answer
