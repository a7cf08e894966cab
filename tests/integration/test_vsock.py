"""The vsock path (our vhost-user backend here) through a real guest: several connections
at once (gRPC calls and process streams), megabytes each way, byte-exact."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading

import pytest

from vmrun.agent.client import AgentClient
from vmrun.oci import guest_spec, load_bundle
from vmrun.sandbox import Sandbox
from vmrun.stdio import open_process_stream

pytestmark = pytest.mark.integration

CONNECTIONS = 4
SIZE = 4 << 20


def test_concurrent_connections_carry_megabytes_both_ways(vm_env):
    bundle_dir = vm_env.bundle("pod", ["sleep", "600"])
    data = os.urandom(SIZE)
    (bundle_dir / "rootfs" / "data.bin").write_bytes(data)
    bundle = load_bundle(bundle_dir)
    process = {"args": ["sh", "-c", "sha256sum; cat /data.bin"], "cwd": "/", "env": ["PATH=/bin"],
               "user": {"uid": 0, "gid": 0}}
    results: dict[int, tuple[bytes, int]] = {}

    with Sandbox("vsock-test", vm_env.config()) as sandbox:
        sandbox.share_container("c", bundle)
        sandbox.agent.create_container("c", guest_spec(bundle.spec, "c"))
        sandbox.agent.start_container("c")

        def worker(i: int) -> None:
            # Its own client: its own gRPC channel, so its own vsock connection; and the
            # process's own stream, another.
            with AgentClient(str(sandbox.agent_socket)) as client:
                exec_id = f"e{i}"
                client.exec_process("c", exec_id, process)
            stream = open_process_stream(sandbox.vsock_address, "c", exec_id)
            payload = data[i:] + data[:i]  # distinct per connection
            halves = [payload[: SIZE // 2], payload[SIZE // 2:]]
            writer = threading.Thread(target=lambda: ([stream.write_stdin(half) for half in halves],
                                                      stream.close_stdin()))
            writer.start()
            with tempfile.TemporaryFile() as out, open(os.devnull, "wb") as null:
                status = stream.relay(stdin=None, stdout=out.fileno(), stderr=null.fileno(), terminal=False)
                out.seek(0)
                results[i] = (out.read(), status)
            writer.join()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        sandbox.agent.remove_container("c", force=True)

    assert sorted(results) == list(range(CONNECTIONS))
    for i, (out, status) in results.items():
        payload = data[i:] + data[:i]
        header = hashlib.sha256(payload).hexdigest().encode() + b"  -\n"
        assert status == 0
        assert out[: len(header)] == header
        assert hashlib.sha256(out[len(header):]).digest() == hashlib.sha256(data).digest()
