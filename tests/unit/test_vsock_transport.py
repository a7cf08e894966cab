"""The transports' host side: HybridVsock process management and errors, KernelVsock,
and the choice between them."""

import socket
import time
from pathlib import Path

import pytest

import vmrun.hypervisor.vsock.transports as transports
from vmrun.errors import VsockError
from vmrun.hypervisor.vsock.hybrid import HybridVsock
from vmrun.hypervisor.vsock.kernel import KernelVsock
from vmrun.hypervisor.vsock.transports import make_transport


def test_hybrid_qemu_args_and_hotplug_attributes(tmp_path):
    t = HybridVsock(tmp_path, 7, device_id="vs1")
    assert t.qemu_args() == [
        "-chardev", f"socket,id=vs1-chr,path={tmp_path / 'vhost-user-vsock.sock'}",
        "-device", "vhost-user-vsock-pci,id=vs1,chardev=vs1-chr",
    ]
    assert t.device().backend_socket == t.socket_path and t.socket_path.parent == tmp_path
    assert t.guest_cid == 7
    assert t.port_path(1024) == Path(f"{t.uds_path}_1024")


def test_hybrid_start_waits_for_the_socket_and_close_cleans_up(tmp_path):
    t = HybridVsock(tmp_path / "run", 5)
    t.start()
    try:
        assert t.socket_path.exists() and t.uds_path.exists()
        # the backend accepts a vhost-user connection right away
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(t.socket_path))
        s.close()
    finally:
        t.close()
    assert not t.socket_path.exists() and not t.uds_path.exists()
    assert "listening" in t.log_path.read_text()


def test_hybrid_start_failure_reports_the_backend_error(tmp_path):
    t = HybridVsock(tmp_path, 1)  # CID 1 is not a guest CID: the backend refuses
    with pytest.raises(VsockError, match="vsock backend: cannot start: invalid guest CID 1"):
        t.start()
    t.close()


def test_hybrid_connect_without_a_guest_times_out(tmp_path):
    with HybridVsock(tmp_path, 5) as t:
        start = time.monotonic()
        with pytest.raises(VsockError, match="timed out after 0.3s"):
            t.connect(1024, timeout=0.3)
        assert time.monotonic() - start < 2


def test_hybrid_connect_without_the_backend_fails_cleanly(tmp_path):
    t = HybridVsock(tmp_path, 5)
    with pytest.raises(VsockError, match="cannot reach the backend"):
        t.connect(1024, timeout=0.5)


def test_hybrid_listen_twice_on_a_port_is_an_error(tmp_path):
    t = HybridVsock(tmp_path, 5)
    ls = t.listen(1234)
    try:
        assert ls.getsockname() == str(t.port_path(1234))
        with pytest.raises(VsockError):
            t.listen(1234)
    finally:
        t.close()
    assert not t.port_path(1234).exists()


def test_kernel_vsock_qemu_args():
    t = KernelVsock(12)
    assert t.qemu_args() == ["-device", "vhost-vsock-pci,id=vsock0,guest-cid=12"]
    t.start()
    t.close()


def test_kernel_vsock_connect_failure_is_a_vsock_error():
    t = KernelVsock(0xFFFF_FFF0)  # no such guest (or no vsock at all here)
    with pytest.raises(VsockError, match="vsock: connecting to 4294967280:1"):
        t.connect(1, timeout=0.5)


def test_make_transport_prefers_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(transports, "kernel_vsock_available", lambda: True)
    t = make_transport(tmp_path, 9)
    assert isinstance(t, KernelVsock) and t.guest_cid == 9
    monkeypatch.setattr(transports, "kernel_vsock_available", lambda: False)
    t = make_transport(tmp_path, 9)
    assert isinstance(t, HybridVsock) and t.run_dir == tmp_path and t.guest_cid == 9


def test_kernel_vsock_available_needs_an_openable_device(tmp_path):
    assert not transports.kernel_vsock_available(str(tmp_path / "missing"))
    dev = tmp_path / "dev"
    dev.write_bytes(b"")
    assert transports.kernel_vsock_available(str(dev))
    dev.chmod(0o000)
    # root opens it anyway; others must not
    import os
    assert transports.kernel_vsock_available(str(dev)) == (os.geteuid() == 0)
