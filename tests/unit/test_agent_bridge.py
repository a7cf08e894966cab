import hashlib
import os
import socket
import threading

from vmrun.agent.bridge import SocketBridge


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
