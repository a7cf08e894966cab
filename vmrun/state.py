"""Container state under the global --root: one directory per container id."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from vmrun.agent.files import write_atomic, write_json_atomic
from vmrun.agent.linux import pid_exists
from vmrun.errors import ContainerExistsError, ContainerNotFoundError, VmrunError
from vmrun.oci import OCI_VERSION, validate_id

DEFAULT_ROOT = Path("/run/vmrun")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    status: str  # creating, created, running, paused, stopped
    pid: int = 0  # the host process that stands for the container
    created: str = field(default_factory=now_rfc3339)
    annotations: dict = field(default_factory=dict)
    owner: str = ""
    vm_dir: str = ""  # the sandbox's sockets and logs
    sandbox_id: str = ""  # the container whose guest this one runs in (itself if it owns one)
    daemon_pid: int = 0  # the sandbox daemon holding the guest, for the owner
    guest_pid: int = 0  # the init process's pid inside the guest
    execs: dict[str, int] = field(default_factory=dict)  # exec id -> its shim's pid
    paused_from: str = ""  # the status a paused container returns to when resumed

    @property
    def owns_guest(self) -> bool:
        return self.sandbox_id == self.id

    @property
    def agent_socket(self) -> str:
        return f"{self.vm_dir}/agent.sock"

    def runc_json(self) -> dict:
        """The document `runc state` prints."""
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if self.live_status() != "stopped" else 0,  # as runc
            "status": self.live_status(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            **({"annotations": self.annotations} if self.annotations else {}),
            "owner": self.owner,
        }

    def live_status(self) -> str:
        """The recorded status, or `stopped` once the process standing for it is gone.

        While "creating", that process is the one creating it: if it died half-way, the
        container reads as stopped, so `delete` can clean up what it left.
        """
        if self.status != "stopped" and not alive(self.pid):
            return "stopped"
        return self.status


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    if pid <= 0 or not pid_exists(pid):
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_pid_file(path: str, pid: int) -> None:
    write_atomic(path, str(pid))


class StateStore:
    def __init__(self, root: Path):
        self.root = root

    @contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """Serialise changes to one container (flock on its state directory)."""
        try:
            fd = os.open(self._dir(container_id), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise ContainerNotFoundError(f"container {container_id!r} does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _dir(self, container_id: str) -> Path:
        return self.root / validate_id(container_id)

    def create(self, state: ContainerState) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self._dir(state.id).mkdir(mode=0o711)
        except FileExistsError:
            raise ContainerExistsError(f"container {state.id!r} already exists") from None
        self.save(state)

    def save(self, state: ContainerState) -> None:
        write_json_atomic(self._dir(state.id) / "state.json", dataclasses.asdict(state))

    def load(self, container_id: str) -> ContainerState:
        path = self._dir(container_id) / "state.json"
        try:
            return ContainerState(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ContainerNotFoundError(f"container {container_id!r} does not exist") from None
        except (ValueError, TypeError):
            raise VmrunError(f"the state of container {container_id!r} is damaged ({path})") from None

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self._dir(container_id), ignore_errors=True)

    def list(self) -> list[ContainerState]:
        if not self.root.is_dir():
            return []
        states = []
        for entry in sorted(self.root.iterdir()):
            try:
                states.append(self.load(entry.name))
            except (ContainerNotFoundError, ValueError, TypeError):
                continue
        return states
