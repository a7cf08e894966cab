"""The ready port: one READY, from our guest, and then it is closed (a guest that later
connects to it, or another guest, is not heard). Which peer may say READY is tested in
tests/unit/test_ready_greeting.py."""

from __future__ import annotations

import socket

import pytest

from vmrun.common.constants import ready_port
from vmrun.hypervisor.vsock.hybrid import HybridVsock
from vmrun.hypervisor.vsock.transports import kernel_vsock_available
from vmrun.sandbox import Sandbox


@pytest.mark.skipif(kernel_vsock_available(), reason="looks at the hybrid transport's ready socket")
def test_the_ready_port_is_closed_once_the_guest_said_ready(vm_env):
    with Sandbox("ready-once", vm_env.config()) as sandbox:
        cid = 3 + int(sandbox.dir.name[:7], 16)  # as the sandbox numbers its guest
        port_path = HybridVsock(sandbox.dir, cid).port_path(ready_port(cid))
        with socket.socket(socket.AF_UNIX) as late:
            with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
                late.connect(str(port_path))
        assert sandbox.kernel_release  # the guest still serves
