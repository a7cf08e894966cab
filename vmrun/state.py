"""Container state under the global --root: one directory per container id."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vmrun.errors import ContainerExistsError, ContainerNotFoundError
from vmrun.oci import OCI_VERSION, validate_id

DEFAULT_ROOT = Path("/run/vmrun/state")


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

    def runc_json(self) -> dict:
        """The document `runc state` prints."""
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid,
            "status": self.live_status(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "annotations": self.annotations,
            "owner": self.owner,
        }

    def live_status(self) -> str:
        """The recorded status, or `stopped` once the process standing for it is gone."""
        if self.status in ("running", "paused", "created") and not _alive(self.pid):
            return "stopped"
        return self.status


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class StateStore:
    def __init__(self, root: Path):
        self.root = root

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
        path = self._dir(state.id) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state)))
        os.replace(tmp, path)

    def load(self, container_id: str) -> ContainerState:
        path = self._dir(container_id) / "state.json"
        try:
            return ContainerState(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ContainerNotFoundError(f"container {container_id!r} does not exist") from None

    def exists(self, container_id: str) -> bool:
        return (self._dir(container_id) / "state.json").exists()

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
