"""Facts the host and the in-guest agent agree on."""

# vsock ports. The agent serves gRPC on AGENT_PORT; once it listens, it connects to the
# host's ready port and says READY (one line), so the host never dials a guest that is
# not listening. That connection then carries the host's first gRPC connection.
# The ready port is READY_PORT_BASE + the guest's CID: with kernel vsock the host's ports
# are shared by every guest, and a clone learns its CID only once its device is plugged.
AGENT_PORT = 1024
READY_PORT_BASE = 1 << 30


def ready_port(guest_cid: int) -> int:
    return READY_PORT_BASE + guest_cid
READY_MESSAGE = b"READY"

# virtio-fs tag of the sandbox's shared directory and where the agent mounts it.
SHARED_FS_TAG = "vmrun"
SHARED_DIR = "/run/vmrun/shared"
# Per-container bundle directories the agent writes for crun.
BUNDLES_DIR = "/run/vmrun/bundles"
# Where crun hands the agent a container's pty master (--console-socket).
CONSOLES_DIR = "/run/vmrun/consoles"
# The agent's gRPC server listens here; the vsock bridge forwards to it.
AGENT_UNIX_SOCKET = "/run/vmrun/agent.sock"
# The guest's own network namespace (the agent is pid 1): the pod's interfaces are there,
# and containers on the pod's network join it by this path.
POD_NETNS = "/proc/1/ns/net"

# Kernel command-line parameters the agent reads from /proc/cmdline.
CMDLINE_PREFIX = "vmrun."


def agent_kernel_params(translated: bool, vcpus: int) -> str:
    """The agent's kernel command-line parameters: its port, and whether it runs a warm-up
    container (vmrun/agent/warm_up.py). That is worth it only when guest code is translated
    (TCG) and the guest has a vCPU to spare for it: with one, the agent's start took 245 ms
    longer and crun 105 ms less."""
    params = f"{CMDLINE_PREFIX}agent_port={AGENT_PORT}"
    return f"{params} {CMDLINE_PREFIX}warm_up=1" if translated and vcpus > 1 else params


def container_rootfs(container_id: str) -> str:
    """Where a container's rootfs appears in the guest (on the shared directory)."""
    return f"{SHARED_DIR}/{container_id}/rootfs"
