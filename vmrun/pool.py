"""A pool of ready guests (Kata's VM cache): `vmrun pool serve` keeps N sandbox daemons
booted (or cloned from the template) and idle; `create` takes one over a local socket
instead of starting a guest, and the pool starts a replacement.

It answers on a control socket (vmrun.control): `take` gives {"daemon_pid",
"daemon_start_time", "vm_dir"}, or
fails when the pool is empty; `status` gives {"idle", "size"}. The container that takes a guest adopts
it once recorded, so it outlives the pool; a guest not adopted goes when the pool goes.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmrun.config import Config
from vmrun.control import ControlError, ControlServer, control_call
from vmrun.errors import VmrunError
from vmrun.process_ref import ProcessRef
from vmrun.sandbox import vm_dir_for
from vmrun.sandbox_daemon import spawn_sandbox_daemon, stop_sandbox_daemon

log = logging.getLogger("vmrun.pool")
_CLIENT_TIMEOUT = 2.0
_RETRY_DELAY = 2.0


@dataclass(frozen=True)
class PooledGuest:
    daemon: ProcessRef
    vm_dir: str


class Pool:
    def __init__(self, config: Config, size: int):
        self.config = config
        self.size = size
        self._idle: list[PooledGuest] = []
        self._starting = 0
        self._cond = threading.Condition()
        self._stopping = False

    def idle_count(self) -> int:
        with self._cond:
            self._prune()
            return len(self._idle)

    def _prune(self) -> None:
        """Forget guests that died idle; the filler replaces them."""
        living = [g for g in self._idle if g.daemon.alive()]
        if len(living) != len(self._idle):
            self._idle = living
            self._cond.notify_all()

    def _fill(self) -> None:
        """Keep `size` guests ready (counting those being started)."""
        while True:
            with self._cond:
                # Woken when a guest is taken; the timeout also notices guests that died idle.
                while not self._cond.wait_for(
                        lambda: self._stopping or len(self._idle) + self._starting < self.size, timeout=5.0):
                    self._prune()
                if self._stopping:
                    return
                self._starting += 1
            sandbox_id = f"pool-{secrets.token_hex(8)}"
            try:
                vm_dir = vm_dir_for(self.config, sandbox_id)
                daemon = spawn_sandbox_daemon(sandbox_id, vm_dir, "", self.config.boot_timeout)
                guest = PooledGuest(daemon, str(vm_dir))
            except VmrunError as exc:
                log.error("cannot start a guest for the pool: %s", exc)
                guest = None
            with self._cond:
                stopping = self._stopping
                if guest is not None and not stopping:
                    self._idle.append(guest)
            if guest is not None and stopping:
                # Started while the pool was stopping: it goes too, before serve() returns.
                stop_sandbox_daemon(guest.daemon, Path(guest.vm_dir))
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            if guest is None:
                time.sleep(_RETRY_DELAY)
            _reap_children()

    def take(self) -> PooledGuest | None:
        with self._cond:
            self._prune()
            if not self._idle:
                return None
            guest = self._idle.pop(0)
            self._cond.notify_all()  # the filler starts a replacement
            return guest

    def _take_request(self, request: dict) -> dict:
        guest = self.take()
        if guest is None:
            raise VmrunError("the pool is empty")
        # With its start time: the taker checks that the pid it signals is still this daemon.
        return {"daemon_pid": guest.daemon.pid, "daemon_start_time": guest.daemon.start_time, "vm_dir": guest.vm_dir}

    def serve(self, socket_path: Path) -> None:
        """Serve until SIGTERM/SIGINT; then stop every idle guest."""
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        # The socket first: a pool that cannot serve starts no guest.
        server = ControlServer(socket_path, {
            "take": self._take_request,
            "status": lambda request: {"idle": self.idle_count(), "size": self.size},
        })
        threading.Thread(target=self._fill, name="pool-fill", daemon=True).start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.close()
            with self._cond:
                self._stopping = True
                idle, self._idle = self._idle, []
                self._cond.notify_all()
            for guest in idle:
                stop_sandbox_daemon(guest.daemon, Path(guest.vm_dir))
            with self._cond:
                # A guest still starting is stopped by the filler once it is up.
                self._cond.wait_for(lambda: self._starting == 0, timeout=self.config.boot_timeout + 30)


def _reap_children() -> None:
    # Adopted daemons are still our children: collect the ones whose pods are gone.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def pool_status(socket_path: Path) -> dict:
    """How many guests the pool at `socket_path` has ready; ControlError if none answers."""
    return dict(control_call(socket_path, "status", timeout=_CLIENT_TIMEOUT))  # type: ignore[arg-type]


def take_from_pool(config: Config) -> PooledGuest | None:
    """A ready guest from the configured pool; None when there is no pool or it is empty."""
    if not config.pool_socket:
        return None
    try:
        reply = dict(control_call(Path(config.pool_socket), "take", timeout=_CLIENT_TIMEOUT))  # type: ignore[arg-type]
    except ControlError as exc:
        log.debug("no guest from the pool at %s: %s", config.pool_socket, exc)
        return None
    start_time = reply.get("daemon_start_time")  # None from an older pool: unknown
    daemon = ProcessRef(int(reply["daemon_pid"]), None if start_time is None else int(start_time))
    guest = PooledGuest(daemon, str(reply["vm_dir"]))
    if Path(guest.vm_dir).parent != config.vm_dir or guest.daemon.pid <= 0:
        log.warning("ignoring a pool guest outside %s: %s", config.vm_dir, guest)
        return None
    return guest
