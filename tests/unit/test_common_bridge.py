import hashlib
import os
import socket
import threading

from vmrun.common.bridge import SocketBridge, first_then, read_line


def echo_server(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    def pump(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_bridge_splices_concurrent_connections_with_half_close(tmp_path):
    backend = echo_server(str(tmp_path / "echo.sock"))
    front = socket.socket(socket.AF_UNIX)
    front.bind(str(tmp_path / "front.sock"))
    front.listen()

    def dial():
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(tmp_path / "echo.sock"))
        return conn

    bridge = SocketBridge(front, dial, "test").start()
    payloads = [os.urandom(3 << 20) for _ in range(3)]
    results = [None] * 3

    def client(i):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(tmp_path / "front.sock"))
            sender = threading.Thread(target=lambda: (conn.sendall(payloads[i]), conn.shutdown(socket.SHUT_WR)))
            sender.start()
            received = bytearray()
            while data := conn.recv(65536):
                received += data
            sender.join()
            results[i] = hashlib.sha256(received).digest()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [hashlib.sha256(p).digest() for p in payloads]
    bridge.close()
    backend.close()


def test_first_then_hands_out_the_connected_socket_once(tmp_path):
    backend = echo_server(str(tmp_path / "echo.sock"))
    ready_host, ready_guest = socket.socketpair()
    dialled = []

    def dial():
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(tmp_path / "echo.sock"))
        dialled.append(conn)
        return conn

    dial_next = first_then(ready_host, dial)
    assert dial_next() is ready_host
    second = dial_next()
    assert dialled == [second]
    for sock in (ready_host, ready_guest, second):
        sock.close()
    backend.close()


def test_read_line_leaves_what_follows_the_line_unread():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"READY 1.0 uptime=2.5\n\x00\x00\x12\x04 grpc bytes")
        assert read_line(b, 256) == b"READY 1.0 uptime=2.5\n"
        assert b.recv(64) == b"\x00\x00\x12\x04 grpc bytes"


def test_read_line_stops_at_its_limit_or_at_eof():
    a, b = socket.socketpair()
    with b:
        a.sendall(b"x" * 10)
        assert read_line(b, 4) == b"xxxx"
        a.close()
        assert read_line(b, 256) == b"xxxxxx"
