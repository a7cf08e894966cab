"""The in-guest agent's gRPC service: containers and processes through crun."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL
from typing import Callable, Iterator, NoReturn, TypeVar

import grpc

import vmrun
from vmrun.agent import agent_pb2 as pb
from vmrun.agent import agent_pb2_grpc, debug_log
from vmrun.agent.process_info import process_info
from vmrun.agent import network
from vmrun.agent.crun import Crun, CrunError, Stdio, write_json
from vmrun.agent.oom import OomWatch, oom_kills
from vmrun.agent.processes import Child, Reaper, exit_status
from vmrun.agent.spare_netns import SpareNetns
from vmrun.agent.vsock_guard import GuardedSpawner
from vmrun.common import linux
from vmrun.common.bridge import close_listener
from vmrun.common.constants import BUNDLES_DIR, CONSOLES_DIR, SHARED_DIR

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_CONSOLE_TIMEOUT = 30.0
_SHARE_MOUNT_TIMEOUT = 30.0
_PIPE_SIZE = 1 << 20
# Blocking RPCs wake this often to notice a caller that went away (or a closed stream).
_WAKE_SLICE = 1.0


class NotFound(Exception):
    pass


class InvalidArgument(Exception):
    pass


class SharedFd:
    """One of the agent's stdio fds, used by concurrent RPCs.

    Closing only marks it closed; the fd itself is closed when its last user lets go, so
    its number cannot be reused (handing another process's output to a reader) while a
    process stream still holds it. Readers are woken (notify_on_close) and let go.
    """

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        self._users = 1  # the owner's hold, dropped by close()
        self._closed = False
        self._lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []  # wakes readers blocked on the fd

    def notify_on_close(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._on_close.append(wake)
        if self._closed:
            wake()

    def forget(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._on_close:
                self._on_close.remove(wake)

    @property
    def closed(self) -> bool:
        return self._closed

    def acquire(self) -> bool:
        """Hold the fd open; False once it is closed."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
        os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            wakes = list(self._on_close)
        for wake in wakes:
            wake()
        self.release()

    @contextlib.contextmanager
    def use(self) -> Iterator[int]:
        if not self.acquire():
            raise InvalidArgument(f"{self.name} is closed")
        try:
            yield self.fd
        finally:
            self.release()


@dataclass
class GuestProcess:
    """A container's init or exec process and the agent's ends of its stdio (with a
    terminal, stdin and stdout are the same pty master)."""

    child: Child
    stdin: SharedFd | None
    stdout: SharedFd | None
    stderr: SharedFd | None
    terminal: bool

    @property
    def pid(self) -> int:
        return self.child.pid

    def close(self) -> None:
        for stream in {self.stdin, self.stdout, self.stderr} - {None}:
            stream.close()
        self.stdin = self.stdout = self.stderr = None

    def write_stdin(self, data: bytes | memoryview) -> None:
        stdin = self.stdin  # read once: close_stdin may clear it meanwhile
        if stdin is None:
            raise InvalidArgument("stdin is closed")
        with stdin.use() as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

    def close_stdin(self) -> None:
        stdin = self.stdin
        if stdin is None:
            return
        if self.terminal:
            # A pty has no half-close: send the EOF character instead.
            with stdin.use() as fd:
                os.write(fd, b"\x04")
        else:
            self.stdin = None
            stdin.close()

    def close_output(self, stdout: bool) -> None:
        """Its host reader went away: the process's next write gets SIGPIPE, as with runc."""
        if self.terminal:
            return  # the pty is its stdin too: it stays until the process ends
        stream = self.stdout if stdout else self.stderr
        if stream is not None:
            # Its reader lets go within a wake slice; then the pipe has no reader left.
            stream.close()

    def resize(self, rows: int, columns: int) -> None:
        import fcntl
        import struct
        import termios

        pty = self.stdout
        if not self.terminal or pty is None:
            raise InvalidArgument("the process has no terminal")
        with pty.use() as fd:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


@dataclass
class Container:
    id: str
    bundle: Path
    init: GuestProcess
    execs: dict[str, GuestProcess] = field(default_factory=dict)
    cgroup: Path | None = None  # its cgroup, found at create: read after its processes exit

    def processes(self) -> list[GuestProcess]:
        return [self.init, *self.execs.values()]


T = TypeVar("T")


_STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (network.NetworkConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (CrunError, grpc.StatusCode.FAILED_PRECONDITION),
    (OSError, grpc.StatusCode.INTERNAL),
)
_MAPPED = tuple(kind for kind, _ in _STATUS_CODES)


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """Fail the call with the status code for `exc` and its one-line message."""
    for kind, code in _STATUS_CODES:
        if isinstance(exc, kind):
            context.abort(code, str(exc))
    raise exc


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Map the agent's failures onto gRPC status codes with a one-line message."""

    @functools.wraps(method)
    def wrapper(self: "AgentService", request: object, context: grpc.ServicerContext) -> T:
        started = time.monotonic()
        try:
            result = method(self, request, context)
        except _MAPPED as exc:
            debug_log.debug(f"{method.__name__}{_call_subject(request)}: {type(exc).__name__}: {exc}")
            _abort(context, exc)
        debug_log.debug(f"{method.__name__}{_call_subject(request)}: ok in {time.monotonic() - started:.3f} s")
        return result

    return wrapper


def _call_subject(request: object) -> str:
    """The container and process a call is about, for a debug line."""
    names = [str(getattr(request, field)) for field in ("container_id", "exec_id")
             if getattr(request, field, "")]
    return f"({', '.join(names)})" if names else ""


def _rpc_stream(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """_rpc for a response stream: failures while iterating are mapped too."""

    @functools.wraps(method)
    def wrapper(self: "AgentService", request: object, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from method(self, request, context)
        except _MAPPED as exc:
            _abort(context, exc)

    return wrapper


def _check_id(kind: str, value: str) -> str:
    if not _SAFE_ID.match(value):
        raise InvalidArgument(f"invalid {kind} {value!r}")
    return value


class _ConsoleReceiver:
    """A --console-socket: receives the pty master crun sends over SCM_RIGHTS."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(_CONSOLE_TIMEOUT)
        self.master: int | None = None
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
                self.master = fds[0] if fds else None
                for extra in fds[1:]:
                    os.close(extra)
        except OSError:
            pass

    def take_master(self) -> int:
        self._thread.join(_CONSOLE_TIMEOUT)
        self.close()
        if self.master is None:
            raise CrunError("crun sent no terminal over the console socket")
        return self.master

    def close(self) -> None:
        close_listener(self._listener)
        self.path.unlink(missing_ok=True)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass
    return r, w


def _cgroup_dir(pid: int) -> Path:
    """The cgroup v2 directory of a process (its line "0::/path" in /proc/PID/cgroup)."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        pass
    raise NotFound(f"process {pid} has no cgroup (it has exited)")


def _read_number(path: Path) -> int:
    """A cgroup file holding one number ("max" counts as 0: no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _flat_keyed(path: Path) -> dict[str, int]:
    """A cgroup "key value" file (cpu.stat, memory.stat)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in lines if len(line.split()) == 2) if v.isdigit()}


def _io_stat(path: Path) -> list[dict[str, int]]:
    """io.stat: one line per device, "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ..."."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    devices = []
    for line in lines:
        device, *fields = line.split()
        major, _, minor = device.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        entry = {"major": int(major), "minor": int(minor)}
        for field in fields:
            key, _, value = field.partition("=")
            if value.isdigit():
                entry[key] = int(value)
        devices.append(entry)
    return devices


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, reaper: Reaper, spare_netns: SpareNetns | None = None):
        # crun, and so every container and exec, starts under the vsock guard's filter.
        self._spawner = GuardedSpawner(reaper)
        self._spare_netns = spare_netns
        self._reaper = reaper
        self._crun = Crun(self._spawner)
        self._containers: dict[str, Container] = {}
        self._lock = threading.Lock()
        self._oom_watch = OomWatch(self._container_cgroups)

    # ---- helpers ----

    def _container(self, container_id: str) -> Container:
        with self._lock:
            container = self._containers.get(container_id)
        if container is None:
            raise NotFound(f"container {container_id!r} does not exist")
        return container

    def process(self, container_id: str, exec_id: str) -> GuestProcess:
        """A container's init (no exec id) or one of its execs; NotFound if none."""
        return self._process(container_id, exec_id)

    def exit_code(self, process: GuestProcess, timeout: float | None) -> int | None:
        """The runc-style exit status of `process` once it exited (None: still running)."""
        status = self._reaper.wait(process.child, timeout)
        return None if status is None else exit_status(status)[0]

    def kill(self, process: GuestProcess, signum: int) -> None:
        # Once exited, its pid may be another process's: nothing is sent then.
        self._reaper.kill(process.child, signum)

    def _process(self, container_id: str, exec_id: str) -> GuestProcess:
        container = self._container(container_id)
        if not exec_id:
            return container.init
        process = container.execs.get(exec_id)
        if process is None:
            raise NotFound(f"process {exec_id!r} of container {container_id!r} does not exist")
        return process

    def _launch(
        self,
        terminal: bool,
        launch: Callable[[Stdio, Path | None], Child],
        abandon: Callable[[Child], None],
    ) -> GuestProcess:
        """Start a process with fresh stdio: pipes, or a pty received from crun.

        `abandon` undoes a launch that succeeded when its terminal never arrived."""
        if terminal:
            # A short path of its own: a unix socket path must fit in 108 bytes, and
            # callers' container ids alone are 64 characters.
            # (Not `secrets`: its imports cost boot time under TCG.)
            console_path = Path(CONSOLES_DIR) / f"{os.urandom(8).hex()}.sock"
            console_path.parent.mkdir(parents=True, exist_ok=True)
            receiver = _ConsoleReceiver(console_path)
            null = os.open("/dev/null", os.O_RDWR)
            try:
                child = launch(Stdio(null, null, null), console_path)
            except BaseException:
                receiver.close()
                raise
            finally:
                os.close(null)
            try:
                master = receiver.take_master()
            except BaseException:
                with contextlib.suppress(CrunError, OSError):
                    abandon(child)
                raise
            pty = SharedFd(master, "the terminal")
            return GuestProcess(child, pty, pty, None, terminal=True)
        in_r, in_w = _pipe()
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        try:
            child = launch(Stdio(in_r, out_w, err_w), None)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return GuestProcess(
            child, SharedFd(in_w, "stdin"), SharedFd(out_r, "stdout"), SharedFd(err_r, "stderr"), terminal=False
        )

    # ---- sandbox ----

    @_rpc
    def CreateSandbox(self, request: pb.CreateSandboxRequest, context: grpc.ServicerContext) -> pb.CreateSandboxResponse:
        debug_log.enable(request.debug)
        self._refresh(request.host_time_ns, request.entropy, request.hostname)
        if request.shared_fs_tag and not linux.is_mounted(SHARED_DIR):
            linux.mount_with_retry(request.shared_fs_tag, SHARED_DIR, "virtiofs", _SHARE_MOUNT_TIMEOUT)
        return pb.CreateSandboxResponse(kernel_release=os.uname().release)

    @_rpc
    def DestroySandbox(self, request: pb.DestroySandboxRequest, context: grpc.ServicerContext) -> pb.Empty:
        with self._lock:
            ids = list(self._containers)
        for container_id in ids:
            self._remove(container_id, force=True)
        if linux.is_mounted(SHARED_DIR):
            linux.umount(SHARED_DIR)
        return pb.Empty()

    @_rpc
    def RefreshGuest(self, request: pb.RefreshGuestRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._refresh(request.host_time_ns, request.entropy, request.hostname)
        return pb.Empty()

    def _refresh(self, host_time_ns: int, entropy: bytes, hostname: str) -> None:
        if host_time_ns:
            linux.set_clock(host_time_ns)
        if entropy:
            linux.add_entropy(entropy)
        if hostname:
            linux.set_hostname(hostname)

    # ---- containers ----

    @_rpc
    def CreateContainer(self, request: pb.CreateContainerRequest, context: grpc.ServicerContext) -> pb.CreateContainerResponse:
        container_id = _check_id("container id", request.container_id)
        try:
            spec = json.loads(request.spec_json)
        except ValueError as exc:
            raise InvalidArgument(f"container spec is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("process", {}), dict):
            raise InvalidArgument("container spec is not a JSON object with a process object")
        with self._lock:
            if container_id in self._containers:
                raise InvalidArgument(f"container {container_id!r} already exists")
        bundle = Path(BUNDLES_DIR) / container_id
        if bundle.exists():
            shutil.rmtree(bundle)
        spare_netns = self._spare_netns if self._spare_netns is not None and self._spare_netns.offer(spec) else None
        terminal = bool(spec.get("process", {}).get("terminal"))
        try:
            write_json(bundle / "config.json", spec)
            init = self._launch(
                terminal,
                lambda stdio, console: self._crun.create(container_id, bundle, stdio, console, request.start),
                # crun created the container: without its terminal it is of no use.
                lambda _child: self._crun.delete(container_id, force=True),
            )
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        finally:
            if spare_netns is not None:
                spare_netns.release()
        try:
            cgroup = _cgroup_dir(init.pid)
        except NotFound:
            cgroup = None  # exited already: no OOM to tell of later
        with self._lock:
            self._containers[container_id] = Container(container_id, bundle, init, cgroup=cgroup)
        return pb.CreateContainerResponse(pid=init.pid)

    @_rpc
    def StartContainer(self, request: pb.ContainerRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._container(request.container_id)
        self._crun.start(request.container_id)
        return pb.Empty()

    @_rpc
    def RemoveContainer(self, request: pb.RemoveContainerRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._container(request.container_id)
        self._remove(request.container_id, request.force)
        return pb.Empty()

    def _remove(self, container_id: str, force: bool) -> None:
        container = self._container(container_id)
        try:
            self._crun.delete(container_id, force=force)
        except CrunError:
            if not force:
                raise
        with self._lock:
            self._containers.pop(container_id, None)
        for process in container.processes():
            process.close()
        shutil.rmtree(container.bundle, ignore_errors=True)

    @_rpc
    def ExecProcess(self, request: pb.ExecProcessRequest, context: grpc.ServicerContext) -> pb.ExecProcessResponse:
        container = self._container(request.container_id)
        exec_id = _check_id("exec id", request.exec_id)
        if exec_id in container.execs:
            raise InvalidArgument(f"exec id {exec_id!r} is already in use")
        try:
            process = json.loads(request.process_json)
        except ValueError as exc:
            raise InvalidArgument(f"process is not valid JSON: {exc}") from exc
        process_file = container.bundle / f"exec-{exec_id}.json"
        write_json(process_file, process)
        launched = self._launch(
            bool(process.get("terminal")),
            lambda stdio, console: self._crun.exec(container.id, process_file, stdio, console),
            lambda child: self._reaper.kill(child, SIGKILL),
        )
        container.execs[exec_id] = launched
        return pb.ExecProcessResponse(pid=launched.pid)

    @_rpc
    def WaitProcess(self, request: pb.ProcessRequest, context: grpc.ServicerContext) -> pb.WaitProcessResponse:
        process = self._process(request.container_id, request.exec_id)
        # In slices: a wait whose caller went away must give its worker thread back.
        while (status := self._reaper.wait(process.child, _WAKE_SLICE)) is None:
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
        code, signal = exit_status(status)
        container = self._containers.get(request.container_id)
        return pb.WaitProcessResponse(exit_status=code, signal=signal,
                                      oom_kills=oom_kills(container.cgroup if container else None))

    @_rpc
    def SignalProcess(self, request: pb.SignalProcessRequest, context: grpc.ServicerContext) -> pb.Empty:
        if request.all:
            self._container(request.container_id)
            self._crun.kill(request.container_id, request.signal, all_processes=True)
        else:
            process = self._process(request.container_id, request.exec_id)
            # Once exited, its pid may be another process's; like runc, signalling an
            # exited process is not an error.
            self._reaper.kill(process.child, request.signal)
        return pb.Empty()

    # ---- terminals ----

    @_rpc
    def ResizeTty(self, request: pb.ResizeTtyRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._process(request.container_id, request.exec_id).resize(request.rows, request.columns)
        return pb.Empty()

    # ---- inspection and control ----

    @_rpc
    def ListProcesses(self, request: pb.ContainerRequest, context: grpc.ServicerContext) -> pb.ListProcessesResponse:
        self._container(request.container_id)
        infos = [info for info in map(process_info, self._crun.pids(request.container_id)) if info is not None]
        return pb.ListProcessesResponse(processes=infos)

    @_rpc
    def PauseContainer(self, request: pb.ContainerRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._container(request.container_id)
        self._crun.pause(request.container_id)
        return pb.Empty()

    @_rpc
    def ResumeContainer(self, request: pb.ContainerRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._container(request.container_id)
        self._crun.resume(request.container_id)
        return pb.Empty()

    @_rpc
    def UpdateContainer(self, request: pb.UpdateContainerRequest, context: grpc.ServicerContext) -> pb.Empty:
        container = self._container(request.container_id)
        try:
            resources = json.loads(request.resources_json)
        except ValueError as exc:
            raise InvalidArgument(f"resources are not valid JSON: {exc}") from exc
        resources_file = container.bundle / "resources.json"
        write_json(resources_file, resources)
        self._crun.update(container.id, resources_file)
        return pb.Empty()

    @_rpc
    def StatsContainer(self, request: pb.ContainerRequest, context: grpc.ServicerContext) -> pb.StatsContainerResponse:
        container = self._container(request.container_id)
        cgroup = _cgroup_dir(container.init.pid)
        cpu = _flat_keyed(cgroup / "cpu.stat")
        memory = _flat_keyed(cgroup / "memory.stat")
        limit = _read_number(cgroup / "memory.max")
        stats = {"cpu": cpu, "memory": memory, "memory_current": _read_number(cgroup / "memory.current"),
                 "memory_max": limit, "pids_current": _read_number(cgroup / "pids.current"),
                 "pids_max": _read_number(cgroup / "pids.max"),
                 "swap_current": _read_number(cgroup / "memory.swap.current"),
                 "swap_max": _read_number(cgroup / "memory.swap.max"),
                 "memory_events": _flat_keyed(cgroup / "memory.events"), "io": _io_stat(cgroup / "io.stat")}
        return pb.StatsContainerResponse(
            cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
            memory_usage_bytes=stats["memory_current"],
            memory_limit_bytes=limit,
            pids_current=stats["pids_current"],
            cgroup_stats_json=json.dumps(stats).encode(),
        )

    # ---- networking ----

    @_rpc
    def UpdateInterface(self, request: pb.UpdateInterfaceRequest, context: grpc.ServicerContext) -> pb.Interface:
        return network.update_interface(request.interface)

    @_rpc
    def RemoveInterface(self, request: pb.RemoveInterfaceRequest, context: grpc.ServicerContext) -> pb.Empty:
        network.remove_interface(request.mac)
        return pb.Empty()

    @_rpc
    def UpdateRoutes(self, request: pb.UpdateRoutesRequest, context: grpc.ServicerContext) -> pb.Routes:
        return network.update_routes(request.routes)

    @_rpc
    def AddNeighbors(self, request: pb.AddNeighborsRequest, context: grpc.ServicerContext) -> pb.Empty:
        network.add_neighbors(list(request.neighbors))
        return pb.Empty()

    @_rpc
    def ListInterfaces(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Interfaces:
        return network.list_interfaces()

    @_rpc
    def ListRoutes(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Routes:
        return network.list_routes()

    # ---- the guest ----

    @_rpc
    def GetGuestDetails(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.GuestDetails:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pb.GuestDetails(
            kernel_release=os.uname().release,
            agent_version=vmrun.__version__,
            memory_bytes=pages,
            cpus=os.cpu_count() or 1,
        )

    @_rpc
    def Health(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(serving=True)

    @_rpc_stream
    def WatchOOM(self, request: pb.Empty, context: grpc.ServicerContext) -> Iterator[pb.OOMEvent]:
        for container_id, count in self._oom_watch.subscribe(context.is_active):
            yield pb.OOMEvent(container_id=container_id, oom_kills=count)

    def _container_cgroups(self) -> dict[str, Path]:
        with self._lock:
            return {c.id: c.cgroup for c in self._containers.values() if c.cgroup is not None}
