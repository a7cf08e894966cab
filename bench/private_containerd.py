"""A containerd of a bench's own, for `ctr` timings: its root, state and sockets under
`work`, the CRI plugin off, the offline busybox image imported (tests/clients/images.py).
Used as `with private_containerd(work, env) as ctr:`; stopped, and the mounts under `work`
taken down, however the bench ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "clients"))
from images import write_archives  # noqa: E402

NAMESPACE = "bench"
IMAGE = "docker.io/library/bbx:latest"


@contextlib.contextmanager
def private_containerd(work: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """Start it; yield the `ctr` argv that reaches it (namespace NAMESPACE, IMAGE there)."""
    (work / "config.toml").write_text(f"""version = 2
root = "{work}/root"
state = "{work}/state"
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
""")
    with open(work / "containerd.log", "wb") as log:
        containerd = subprocess.Popen(["containerd", "--config", str(work / "config.toml")], stdout=log,
                                      stderr=log, env=env, start_new_session=True)
    try:
        ctr = ["ctr", "--address", str(work / "containerd.sock"), "-n", NAMESPACE]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("containerd did not start")
            time.sleep(0.1)
        write_archives(IMAGE, work / "bbx-oci.tar")
        subprocess.run([*ctr, "image", "import", str(work / "bbx-oci.tar")], check=True, capture_output=True)
        yield ctr
    finally:
        os.killpg(containerd.pid, signal.SIGTERM)
        containerd.wait(30)
        for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            point = mount.split()[1]
            if point.startswith(str(work)):
                subprocess.run(["umount", "-l", point], check=False)
