"""A tiny DNS server for tests: every A question is answered with one address."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from vmrun.common import linux


def dns_answer(query: bytes, address: str) -> bytes:
    end = 12
    while query[end]:
        end += query[end] + 1
    question = query[12:end + 5]
    is_a = question[-4:-2] == b"\x00\x01"
    answer = (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(address)) if is_a else b""
    return query[:2] + b"\x81\x80\x00\x01" + (b"\x00\x01" if is_a else b"\x00\x00") + b"\x00\x00\x00\x00" + question + answer


class DnsAnswerer:
    """Answers at `listen` (an address, port 53) in the network namespace `netns`, until close()."""

    def __init__(self, netns: str, listen: str, address: str):
        self.queries: list[bytes] = []
        self._stop = threading.Event()
        made: list[socket.socket] = []

        def bind() -> None:
            fd = os.open(netns, os.O_RDONLY)
            linux.setns(fd, linux.CLONE_NEWNET)
            os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((listen, 53))
            made.append(sock)

        binder = threading.Thread(target=bind)
        binder.start()
        binder.join()
        self._sock = made[0]
        self._address = address
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                query, client = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries.append(query)
            with contextlib.suppress(IndexError, OSError):
                self._sock.sendto(dns_answer(query, self._address), client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
