"""The shim's record of a pod's tasks: each container (a task) and its processes (the
init, and each exec), with the status containerd reads and the exit it waits for."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.shimv2.proto import task_types_pb2 as task_types
from vmrun.shimv2.task_io import IOPaths, ProcessIO

CREATED, RUNNING, STOPPED, PAUSED = task_types.CREATED, task_types.RUNNING, task_types.STOPPED, task_types.PAUSED


@dataclass
class ShimProcess:
    container_id: str
    exec_id: str  # "" for the task's init
    pid: int  # what containerd sees: this shim's pid (the guest's pids are the guest's)
    io_paths: IOPaths
    spec: dict = field(default_factory=dict)  # an exec's process, until it starts
    status: int = CREATED
    exit_status: int = 0
    exited_at: float | None = None
    io: ProcessIO | None = None
    _exited: threading.Event = field(default_factory=threading.Event)

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    def mark_exited(self, status: int) -> bool:
        """Record the exit (once); False if it was recorded already."""
        if self._exited.is_set():
            return False
        self.exit_status, self.exited_at, self.status = status, time.time(), STOPPED
        self._exited.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)

    @property
    def exited(self) -> bool:
        return self._exited.is_set()


@dataclass
class Task:
    id: str
    bundle: Path
    spec: dict
    init: ShimProcess
    rootfs_mounted: bool = False
    execs: dict[str, ShimProcess] = field(default_factory=dict)

    def process(self, exec_id: str) -> ShimProcess | None:
        return self.execs.get(exec_id) if exec_id else self.init
