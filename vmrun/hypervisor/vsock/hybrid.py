"""Hybrid vsock: the guest's vsock reached through unix sockets, via our vhost-user backend.

Used where /dev/vhost-vsock is unavailable. The backend process serves QEMU's
`vhost-user-vsock-pci` device; on the host, a connection to the guest is a unix socket to
`uds_path` that first says "CONNECT <port>\\n" and gets "OK <host port>\\n" back, and the
guest's connections to host port P arrive on the unix socket `<uds_path>_P`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import stat
from pathlib import Path

from vmrun.capped_log import LOG_LIMIT
from vmrun.errors import CommandError, VsockError
from vmrun.hypervisor.devices import QemuDevice
from vmrun.hypervisor.vsock.base import VsockTransport
from vmrun.log import debugging
from vmrun.proc import HelperProcess, stdlib_module_command
from vmrun.ready_pipe import ReadyPipe



START_TIMEOUT = 5.0

# The backend's user and group ids: a free one per running backend, so that a backend taken
# over by its guest shares an id with no other process. systemd leaves 0x70000000 and up
# (below 0x7FFE0000) unassigned; vmrun takes 2**20 ids from 0x78000000.
_BACKEND_IDS = 0x78000000
_ID_COUNT = 1 << 20
# One file per id, flock-ed by the backend using it (the lock goes with its process).
_ID_CLAIMS = Path("/run/vmrun-vsock-ids")


def claim_backend_id(run_dir: Path) -> tuple[int, int]:
    """An id no live backend has, and an fd holding its claim: hand it to the backend."""
    _ID_CLAIMS.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = _ID_CLAIMS.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise VsockError(f"{_ID_CLAIMS} is not a private directory of ours: refusing to use it")
    first = int(hashlib.sha256(str(run_dir).encode()).hexdigest()[:8], 16) % _ID_COUNT
    for offset in range(_ID_COUNT):
        candidate = _BACKEND_IDS + (first + offset) % _ID_COUNT
        fd = os.open(_ID_CLAIMS / str(candidate), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return candidate, fd
        except BlockingIOError:
            os.close(fd)
    raise VsockError("vsock: every backend id is in use")


def _listen_unix(path: Path, backlog: int) -> socket.socket:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise VsockError(f"vsock: cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


class HybridVsock(VsockTransport):
    def __init__(self, run_dir: Path, guest_cid: int, device_id: str = "vsock0") -> None:
        self.run_dir = Path(run_dir)
        self.guest_cid = guest_cid
        self.device_id = device_id  # for QMP device_add / device_del
        # What QEMU needs (also for a QMP chardev-add/device_add hotplug):
        self.socket_path = self.run_dir / "vhost-user-vsock.sock"
        # The host's side of the guest's vsock:
        # ... in a directory of its own, the one place of the run dir the backend may reach.
        self.uds_path = self.run_dir / "vsock" / "vsock.sock"
        self.log_path = self.run_dir / "vsock-backend.log"
        self.backend_id = 0  # claimed at launch
        self._helper: HelperProcess | None = None
        self._ready: ReadyPipe | None = None  # until the backend said it serves
        self._listeners: dict[int, socket.socket] = {}

    @property
    def backend_pid(self) -> int | None:
        return self._helper.pid if self._helper is not None else None

    def alive(self) -> bool:
        return self._helper is not None and self._helper.alive()

    def port_path(self, port: int) -> Path:
        """Where the guest's connections to host `port` arrive."""
        return Path(f"{self.uds_path}_{port}")

    # --- VsockTransport --------------------------------------------------------------------

    def launch(self) -> None:
        """Start the backend on listeners made here: it serves them as a user of its own,
        with no privilege (see vhost_user/__main__.py), and can reach nothing of the run dir
        but the ports directory, whose host ports are made for its group (`listen`)."""
        if self._helper is not None and self._helper.alive():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as ours:  # what the backend now holds, closed here
            self.backend_id, claim = claim_backend_id(self.run_dir)
            ours.callback(os.close, claim)
            ports = self.uds_path.parent
            ports.mkdir(mode=0o710, exist_ok=True)
            os.chown(ports, -1, self.backend_id)
            os.chmod(ports, 0o710)
            listeners = [ours.enter_context(_listen_unix(path, backlog))
                         for path, backlog in ((self.uds_path, 128), (self.socket_path, 1))]
            ready = ReadyPipe()
            try:
                host, qemu = (str(listener.fileno()) for listener in listeners)
                argv, env = stdlib_module_command(
                    "vmrun.hypervisor.vsock.vhost_user", "--socket", str(self.socket_path), "--uds", str(self.uds_path),
                    "--cid", str(self.guest_cid), "--host-fd", host, "--qemu-fd", qemu,
                    "--run-as", str(self.backend_id), "--ready-fd", str(ready.write_fd),
                    *(["--verbose"] if debugging() else []))
                # Its log is capped here too: a backend taken over would not cap its own.
                helper = HelperProcess(name="vsock backend", argv=argv, env=env, log_path=self.log_path,
                                       log_limit=LOG_LIMIT, pass_fds=(int(host), int(qemu), ready.write_fd, claim))
                helper.start()
            except BaseException as exc:
                ready.discard()
                for path in (self.socket_path, self.uds_path):
                    path.unlink(missing_ok=True)
                if isinstance(exc, CommandError):
                    raise VsockError(str(exc)) from exc
                raise
        self._helper, self._ready = helper, ready

    def wait_started(self) -> None:
        helper = self._helper
        if helper is None:
            raise VsockError("vsock: the backend was not launched")
        ready, self._ready = self._ready, None
        try:
            if ready is not None:
                ready.wait(helper, START_TIMEOUT)
        except CommandError as exc:
            self._helper = None
            helper.stop()
            raise VsockError(f"vsock backend: {exc}") from None

    def device(self) -> QemuDevice:
        return QemuDevice("vhost-user-vsock-pci", self.device_id, backend_socket=self.socket_path)

    @property
    def address(self) -> str:
        return f"hybrid:{self.uds_path}"

    def listen(self, port: int) -> socket.socket:
        if port in self._listeners:
            raise VsockError(f"vsock: already listening on host port {port}")
        path = self.port_path(port)
        path.parent.mkdir(mode=0o710, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # The backend (its own group, see launch) connects to it for the guest.
            os.chown(path, -1, self.backend_id)
            os.chmod(path, 0o660)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise VsockError(f"vsock: cannot listen on {path}: {exc.strerror or exc}") from exc
        self._listeners[port] = sock
        return sock

    def signal_stop(self) -> None:
        if self._helper is not None:
            self._helper.signal_stop()

    def close(self) -> None:
        if self._ready is not None:  # launched, never waited for
            self._ready.discard()
            self._ready = None
        if self._helper is not None:
            self._helper.stop()
            self._helper = None
        for port, sock in self._listeners.items():
            sock.close()
            self.port_path(port).unlink(missing_ok=True)
        self._listeners.clear()
        for path in (self.socket_path, self.uds_path):
            path.unlink(missing_ok=True)

