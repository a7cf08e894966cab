"""What each host helper of a running pod may do: QEMU and virtiofsd under seccomp,
virtiofsd without the capabilities that would let a guest make privileged files, the vsock
backend as a user of its own with no privilege, and the pod's files (its directory, a
template's RAM and state) private to root."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from vmrun.sandbox import Sandbox

CAP_MKNOD, CAP_FSETID, CAP_SETFCAP = 27, 4, 31


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def pids_of(program: str, mentioning: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and program.encode() in argv[0] and str(mentioning).encode() in b" ".join(argv):
            found.append(int(proc.name))
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_clones_helpers_are_confined_and_its_files_private(vm_env):
    vm_env.use_templates()
    with Sandbox("confined", vm_env.config()) as sandbox:
        assert "clone_restored" in sandbox.timings, "the sandbox is a clone"
        [qemu] = pids_of("qemu-system", sandbox.dir)
        [virtiofsd] = pids_of("virtiofsd", sandbox.dir)
        assert status_of(qemu)["Seccomp"] == "2"
        assert status_of(virtiofsd)["Seccomp"] == "2"
        assert status_of(virtiofsd)["Seccomp_filters"] == "2"  # ours, then its own
        capabilities = int(status_of(virtiofsd)["CapEff"], 16)
        assert not capabilities & (1 << CAP_MKNOD | 1 << CAP_FSETID | 1 << CAP_SETFCAP)
        # The vsock backend: a user of its own, no privilege, namespaces of its own, and of
        # the sandbox's directory only the ports directory (its group may pass through).
        [backend] = pids_of(sys.executable, sandbox.dir)
        backend_ids = status_of(backend)["Uid"].split() + status_of(backend)["Gid"].split()
        assert len(set(backend_ids)) == 1 and backend_ids[0] != "0", backend_ids
        assert status_of(backend)["CapEff"] == status_of(backend)["CapPrm"] == "0000000000000000"
        assert status_of(backend)["NoNewPrivs"] == "1"
        for namespace in ("net", "ipc"):
            assert os.readlink(f"/proc/{backend}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}")
        assert mode(sandbox.dir) == 0o700
        ports = sandbox.dir / "vsock"
        assert mode(ports) == 0o710 and ports.stat().st_gid == int(backend_ids[0])
    template = vm_env.base / "templates" / "default"
    assert mode(template) == 0o700
    assert {p.name: mode(p) for p in template.iterdir()} == {"memory": 0o600, "state": 0o600,
                                                             "record.json": 0o600}
