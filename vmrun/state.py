"""Container state under the global --root: one directory per container id.

Only root reads it (runc's callers run as root): the root, each directory and each file
are made 0700/0600. Each host process is recorded with its start time (ProcessRef), so a
pid reused by another process is neither trusted nor signalled.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from vmrun.common.files import write_atomic, write_json_atomic
from vmrun.errors import ContainerExistsError, ContainerNotFoundError, VmrunError
from vmrun.oci import OCI_VERSION, validate_id
from vmrun.process_ref import ProcessRef

DEFAULT_ROOT = Path("/run/vmrun")
_DIR_MODE = 0o700
# A state directory this old without its state.json was left by a create that died.
_DEBRIS_AGE = 10.0
log = logging.getLogger("vmrun.state")
_FILE_MODE = 0o600


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    status: str  # creating, created, running, paused, stopped
    pid: int = 0  # the host process that stands for the container
    pid_start_time: int | None = None  # its start time (None: unknown, from an older vmrun)
    created: str = field(default_factory=now_rfc3339)
    annotations: dict = field(default_factory=dict)
    owner: str = ""
    vm_dir: str = ""  # the sandbox's sockets and logs
    host_cgroup: str = ""  # where the guest's host processes run, for the owner (host_cgroup.py)
    shim_cgroup: str = ""  # where the container's shims run: the cgroup its own spec names
    sandbox_id: str = ""  # the container whose guest this one runs in (itself if it owns one)
    daemon_pid: int = 0  # the sandbox daemon holding the guest, for the owner
    daemon_start_time: int | None = None
    guest_pid: int = 0  # the init process's pid inside the guest
    execs: dict[str, ProcessRef] = field(default_factory=dict)  # exec id -> its shim
    paused_from: str = ""  # the status a paused container returns to when resumed
    host_netns: str = ""  # the network namespace vmrun made for the container (container_netns.py)
    hooks: dict = field(default_factory=dict)  # its poststart and poststop hooks, as in the spec

    # pid and daemon_pid stay plain fields: `vmrun state` prints the pid, and older state
    # files (without start times) still load.
    @property
    def process(self) -> ProcessRef:
        """The host process standing for the container (its shim, or `create` itself while creating)."""
        return ProcessRef(self.pid, self.pid_start_time)

    @process.setter
    def process(self, ref: ProcessRef) -> None:
        self.pid, self.pid_start_time = ref.pid, ref.start_time

    @property
    def daemon(self) -> ProcessRef:
        return ProcessRef(self.daemon_pid, self.daemon_start_time)

    @daemon.setter
    def daemon(self, ref: ProcessRef) -> None:
        self.daemon_pid, self.daemon_start_time = ref.pid, ref.start_time

    @classmethod
    def from_json(cls, document: dict) -> ContainerState:
        """A state as save() wrote it, or as an older vmrun did (execs as bare pids)."""
        execs = {exec_id: ProcessRef(shim) if isinstance(shim, int) else ProcessRef(**shim)
                 for exec_id, shim in document.pop("execs", {}).items()}
        return cls(**document, execs=execs)

    @property
    def owns_guest(self) -> bool:
        return self.sandbox_id == self.id

    @property
    def agent_socket(self) -> str:
        return f"{self.vm_dir}/agent.sock"

    def vsock_address(self) -> str:
        """How to reach the pod's guest ports (vmrun/hypervisor/vsock/dial.py)."""
        from vmrun.hypervisor.vsock.dial import recorded_address

        return recorded_address(self.vm_dir)

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
        if self.status != "stopped" and not self.process.alive():
            return "stopped"
        return self.status


def write_pid_file(path: str, pid: int) -> None:
    try:
        write_atomic(path, str(pid))
    except OSError as exc:  # named as the caller gave it, not as the temporary file beside it
        raise VmrunError(f"cannot write pid file {path}: {exc.strerror}") from None


class StateStore:
    def __init__(self, root: Path):
        self.root = root

    @contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """Serialise changes to one container (flock on its state directory)."""
        fd = self._open_dir(container_id)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def locked_if_free(self, container_id: str) -> Iterator[bool]:
        """The lock if nobody holds it (True), else at once False: for chores that can
        wait for the next call, where waiting behind a `create` would not do."""
        fd = self._open_dir(container_id)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def _open_dir(self, container_id: str) -> int:
        try:
            return os.open(self._dir(container_id), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise ContainerNotFoundError(f"container {container_id!r} does not exist") from None

    def _dir(self, container_id: str) -> Path:
        return self.root / validate_id(container_id)

    def create(self, state: ContainerState) -> None:
        """Record a new container. Its processes are the ones running now: those given
        without a start time (`vmrun run` records itself by pid) get theirs here."""
        # An existing root keeps the mode its owner gave it; parents are made as mkdir -p would.
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            self._make_dir(state.id)
        except OSError as exc:
            raise VmrunError(f"cannot record container {state.id!r} in {self.root}: {exc.strerror}") from None
        if state.pid > 0 and state.pid_start_time is None:
            state.process = ProcessRef.of(state.pid)
        if state.daemon_pid > 0 and state.daemon_start_time is None:
            state.daemon = ProcessRef.of(state.daemon_pid)
        try:
            self.save(state)
        except OSError as exc:
            # A full disk: no entry is left that would hold the id for good.
            self.remove(state.id)
            raise VmrunError(f"cannot record container {state.id!r} in {self.root}: {exc.strerror}") from None

    def _make_dir(self, container_id: str) -> None:
        directory = self._dir(container_id)
        try:
            directory.mkdir(mode=_DIR_MODE)
            return
        except FileExistsError:
            if not self._is_debris(directory):
                raise ContainerExistsError(f"container {container_id!r} already exists") from None
        # What a create that died between its mkdir and its first save left: no container.
        self.remove(container_id)
        try:
            directory.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            raise ContainerExistsError(f"container {container_id!r} already exists") from None

    @staticmethod
    def _is_debris(directory: Path) -> bool:
        """A state directory without a state, older than any create still making it."""
        try:
            return (not (directory / "state.json").exists()
                    and time.time() - directory.stat().st_mtime > _DEBRIS_AGE)
        except OSError:
            return False

    def save(self, state: ContainerState) -> None:
        write_json_atomic(self._dir(state.id) / "state.json", dataclasses.asdict(state), mode=_FILE_MODE)

    def load(self, container_id: str) -> ContainerState:
        path = self._dir(container_id) / "state.json"
        try:
            return ContainerState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ContainerNotFoundError(f"container {container_id!r} does not exist") from None
        except (ValueError, TypeError, AttributeError):
            raise VmrunError(f"the state of container {container_id!r} is damaged ({path})") from None

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self._dir(container_id), ignore_errors=True)

    def remove_debris(self, container_id: str) -> None:
        """Remove what a create that died before its first save left under this id, if so."""
        if self._is_debris(self._dir(container_id)):
            self.remove(container_id)

    def list(self) -> list[ContainerState]:
        """Every container recorded; what is not one (a stray file, a damaged or half-made
        entry) is skipped, with a warning, so one cannot hide the others."""
        if not self.root.is_dir():
            return []
        states = []
        for entry in sorted(self.root.iterdir()):
            try:
                states.append(self.load(entry.name))
            except ContainerNotFoundError:
                if entry.is_dir() and not self._is_debris(entry):
                    continue  # being created this very moment
                log.warning("%s in %s is no container: skipped", entry.name, self.root)
            except (VmrunError, ValueError, TypeError) as exc:
                log.warning("%s: skipped", exc)
        return states
