"""The DNS relay: its framing, which name servers it relays to, and the host side's checks
on what the guest sends."""

from __future__ import annotations

import socket

import pytest

from vmrun.common.dns_relay import (MAX_MESSAGE, FrameError, FrameReader, address_index, frame, hello, parse_hello,
                                    query_tag)
from vmrun.network.dns_relay import DnsRelayHost, loopback_nameservers


def test_frames_arrive_whole_whatever_the_pieces():
    stream = frame(7, b"query one") + frame(query_tag(1, 99), b"") + frame(3, b"x" * MAX_MESSAGE)
    reader = FrameReader()
    frames = []
    for offset in range(0, len(stream), 5):
        frames += reader.feed(stream[offset:offset + 5])
    assert frames == [(7, b"query one"), ((1 << 24) | 99, b""), (3, b"x" * MAX_MESSAGE)]
    assert address_index(frames[1][0]) == 1


@pytest.mark.parametrize("length", [0, 3, MAX_MESSAGE + 5, 0xFFFF])
def test_a_frame_of_a_bad_length_breaks_the_stream(length):
    with pytest.raises(FrameError):
        FrameReader().feed(length.to_bytes(2, "big") + b"\0" * 8)


def test_hello_names_addresses_and_nothing_else():
    assert parse_hello(hello(["127.0.0.11", "::1"])[6:]) == ["127.0.0.11", "::1"]
    with pytest.raises(OSError):
        parse_hello(b"127.0.0.11 /etc/passwd")


def test_only_loopback_name_servers_of_the_mounted_resolv_conf_are_relayed(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# docker\nnameserver 127.0.0.11\nnameserver 198.18.0.1\nnameserver ::1\n"
                      "nameserver not-an-address\noptions ndots:0\n")
    spec = {"mounts": [{"destination": "/etc/hosts", "source": "/etc/hosts"},
                       {"destination": "/etc/resolv.conf", "source": str(resolv)}]}
    assert loopback_nameservers(spec) == ["127.0.0.11", "::1"]
    assert loopback_nameservers({"mounts": []}) == []
    spec["mounts"][1]["source"] = str(tmp_path / "missing")
    assert loopback_nameservers(spec) == []


class _Transport:
    """A vsock transport whose guest end is a socketpair the test holds."""

    def __init__(self):
        self.host_end, self.guest_end = socket.socketpair()

    def connect(self, port, timeout=5.0):
        return self.host_end


def _dns_query(query_id: int) -> bytes:
    return query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04peer\x04test\x00\x00\x01\x00\x01"


def test_the_host_asks_only_its_server_and_gives_the_guest_its_own_id(monkeypatch):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    transport = _Transport()
    monkeypatch.setattr("vmrun.network.dns_relay.DNS_PORT", port)  # a server of the test's, not port 53
    relay = DnsRelayHost(transport, "/proc/self/ns/net", ["127.0.0.1"])
    guest = transport.guest_end
    guest.settimeout(5)
    try:
        reader = FrameReader()
        assert reader.feed(guest.recv(100)) == [(0, b"127.0.0.1")]  # the hello
        guest.sendall(frame(query_tag(0, 5), _dns_query(0xBEEF)))
        guest.sendall(frame(query_tag(3, 6), _dns_query(0xCAFE)))  # for no address of ours: dropped
        guest.sendall(frame(query_tag(0, 7), b"short"))  # no DNS header: dropped
        server.settimeout(5)
        asked, client = server.recvfrom(4096)
        assert asked[2:] == _dns_query(0)[2:] and asked[:2] != b"\xbe\xef"  # the host's own id
        server.sendto(b"\x99\x99" + asked[2:], client)  # an answer to no query: dropped
        server.sendto(asked[:2] + b"answer-body", client)
        assert reader.feed(guest.recv(100)) == [(query_tag(0, 5), b"\xbe\xef" + b"answer-body")]
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.recvfrom(4096)  # nothing else was asked
    finally:
        relay.close()
        server.close()
