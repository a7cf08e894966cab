"""An attacker's container: root with every capability, no seccomp profile, no masked or
read-only /proc paths, in the guest's own PID namespace, so that `nsenter -t 1` reaches the
guest's root namespaces (the agent's, where the share is mounted)."""

from __future__ import annotations

import json
from pathlib import Path

from vmrun.busybox import make_busybox_bundle

# Every capability the guest kernel (6.1) knows.
ALL_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]

# The guest's root mount namespace, as the attacker enters it.
IN_GUEST_ROOT = "nsenter -t 1 -m -u -i -n --"


def attacker_bundle(bundle: Path, script: str, *, mounts: list[dict] | None = None) -> Path:
    """A bundle whose process runs `sh -c script` as the attacker described above."""
    make_busybox_bundle(bundle, ["sh", "-c", script])
    config = bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["process"]["terminal"] = False
    spec["process"]["noNewPrivileges"] = False
    spec["process"]["capabilities"] = {kind: list(ALL_CAPABILITIES)
                                       for kind in ("bounding", "effective", "permitted", "inheritable")}
    spec["root"]["readonly"] = False
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "pid"]
    linux.pop("maskedPaths", None)
    linux.pop("readonlyPaths", None)
    linux.pop("seccomp", None)
    linux["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in ("/sys", "/sys/fs/cgroup")]
    spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid"]})
    spec["mounts"].extend(mounts or [])
    config.write_text(json.dumps(spec, indent=2))
    return bundle
