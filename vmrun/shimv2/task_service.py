"""containerd's Task service (containerd.task.v2.Task) for one pod: its guest, held in
this process (a Sandbox, as `vmrun run` holds one), and its tasks in that guest.

The pod's first task boots the guest (the CRI sandbox, or a lone container); later ones
join it. Every process containerd sees has this shim's pid; the guest's own pids are
what Pids lists. When the last task is deleted and containerd says Shutdown, the guest
goes and the shim exits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from google.protobuf import empty_pb2
from google.protobuf.message import Message

import vmrun
from vmrun.config import Config
from vmrun.errors import AgentError, VmrunError
from vmrun.hooks import CREATE_HOOKS, hook_state, parse_hooks, run_hooks, run_hooks_logging_failures
from vmrun.network.dns_relay import loopback_nameservers
from vmrun.oci import guest_process, guest_spec, load_bundle, network_namespace_path
from vmrun.pod import placement
from vmrun.share import share_container_files, unshare_container_files
from vmrun.shimv2 import ttrpc
from vmrun.shimv2.events import EventPublisher, timestamp, to_any
from vmrun.shimv2.metrics import metrics_from_stats
from vmrun.shimv2.proto import shim_pb2 as shim
from vmrun.shimv2.proto import task_events_pb2 as events
from vmrun.shimv2.proto import task_types_pb2 as task_types
from vmrun.shimv2.rootfs import RootfsMount, mount_rootfs, unmount_rootfs
from vmrun.shimv2.task_io import IOPaths, ProcessIO
from vmrun.shimv2.tasks import CREATED, PAUSED, RUNNING, ShimProcess, Task
from vmrun.sizing import fit_guest_to, forget_guest_share

log = logging.getLogger("vmrun.shimv2")

TASK_SERVICE = "containerd.task.v2.Task"
_KILLED = 128 + 9  # a process whose guest went away
_OUTPUT_GRACE = 2.0  # after an exit, for its last output before the exit is published


class TaskService:
    def __init__(self, config: Config, namespace: str, publisher: EventPublisher,
                 on_shutdown: Callable[[], None]):
        self._config = config
        self._namespace = namespace
        self._events = publisher
        self._on_shutdown = on_shutdown
        self._lock = threading.RLock()  # tasks and the sandbox; never held while waiting for an exit
        self._tasks: dict[str, Task] = {}
        self._sandbox = None  # vmrun.sandbox.Sandbox, once the pod's first task boots it
        self._sandbox_id = ""
        self._sandbox_guest_pid = 0
        self._agent = None
        self._ooms_told: dict[str, int] = {}  # container id -> OOM kills published
        # The guest's helpers die with the thread that started them (PR_SET_PDEATHSIG is a
        # thread's, not a process's): one long-lived thread boots and closes the sandbox, not
        # the short-lived thread of the call that asked.
        self._owner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-owner")

    # ---- ttrpc plumbing ----

    def handlers(self) -> dict[str, dict[str, ttrpc.Handler]]:
        methods = shim.DESCRIPTOR.services_by_name["Task"].methods
        table = {}
        for method in methods:
            request_class = getattr(shim, method.input_type.name, None) or empty_pb2.Empty
            table[method.name] = self._handler(getattr(self, method.name), request_class)
        return {TASK_SERVICE: table}

    @staticmethod
    def _handler(call: Callable[[Message], Message], request_class: type[Message]) -> ttrpc.Handler:
        def handle(payload: bytes) -> bytes:
            request = request_class()
            request.ParseFromString(payload)
            try:
                return call(request).SerializeToString()
            except ttrpc.TtrpcError:
                raise
            except AgentError as exc:
                raise ttrpc.TtrpcError(ttrpc.UNAVAILABLE if "unavailable" in str(exc).lower()
                                       else ttrpc.FAILED_PRECONDITION, str(exc)) from None
            except VmrunError as exc:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, str(exc)) from None
        return handle

    def _task(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise ttrpc.TtrpcError(ttrpc.NOT_FOUND, f"task {task_id!r} not found")
        return task

    def _process(self, task_id: str, exec_id: str) -> tuple[Task, ShimProcess]:
        task = self._task(task_id)
        process = task.process(exec_id)
        if process is None:
            raise ttrpc.TtrpcError(ttrpc.NOT_FOUND, f"process {exec_id!r} of task {task_id!r} not found")
        return task, process

    # ---- the pod's guest ----

    def _ensure_sandbox(self, task_id: str, spec: dict) -> None:
        """Boot the pod's guest for its first task; later tasks must belong to it."""
        place = placement(task_id, spec.get("annotations") or {})
        if self._sandbox is not None:
            if place.owns_guest or place.sandbox_id != self._sandbox_id:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION,
                                       f"task {task_id!r} is not of pod {self._sandbox_id!r}")
            return
        if not place.owns_guest:
            raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION,
                                   f"the sandbox {place.sandbox_id!r} of task {task_id!r} is not running here")
        self._sandbox = self._owner.submit(self._boot, task_id, spec).result()
        self._sandbox_id, self._agent = task_id, self._sandbox.agent
        threading.Thread(target=self._watch_ooms, args=(self._agent,), name="oom-events", daemon=True).start()

    def _watch_ooms(self, agent) -> None:
        """/tasks/oom for each OOM kill in the guest, as it happens (until the guest goes)."""
        try:
            for event in agent.watch_oom():
                self._tell_oom(event.container_id, event.oom_kills)
        except AgentError:
            pass

    def _tell_oom(self, container_id: str, count: int) -> None:
        with self._lock:
            if count <= self._ooms_told.get(container_id, 0) or container_id not in self._tasks:
                return
            self._ooms_told[container_id] = count
        self._events.publish("/tasks/oom", events.TaskOOM(container_id=container_id))

    def _boot(self, task_id: str, spec: dict):
        from vmrun.sandbox import Sandbox

        sandbox = Sandbox(task_id, self._config, hostname=spec.get("hostname", "")).start()
        try:
            netns = network_namespace_path(spec)
            if netns:
                sandbox.attach_network(netns)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def _close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._owner.submit(self._sandbox.close).result()
            self._sandbox = self._agent = None

    def close(self) -> None:
        """Everything goes: the tasks' IO, their rootfs mounts, the guest."""
        with self._lock:
            for task in list(self._tasks.values()):
                for process in (task.init, *task.execs.values()):
                    if process.io is not None:
                        process.io.close()
                if task.rootfs_mounted:
                    with contextlib.suppress(OSError):
                        unmount_rootfs(task.bundle)
            self._tasks.clear()
            self._close_sandbox()
        self._owner.shutdown()

    # ---- task life cycle ----

    def Create(self, request: shim.CreateTaskRequest) -> shim.CreateTaskResponse:
        if request.checkpoint:
            raise ttrpc.TtrpcError(ttrpc.UNIMPLEMENTED, "vmrun cannot restore a checkpoint")
        with self._lock:
            if request.id in self._tasks:
                raise ttrpc.TtrpcError(ttrpc.ALREADY_EXISTS, f"task {request.id!r} already exists")
            bundle_dir = Path(request.bundle)
            layers = [RootfsMount(m.type, m.source, tuple(m.options)) for m in request.rootfs]
            with contextlib.ExitStack() as undo:
                mounted = mount_rootfs(bundle_dir, layers) if layers else False
                if mounted:
                    undo.callback(unmount_rootfs, bundle_dir)
                bundle = load_bundle(bundle_dir)
                hooks = parse_hooks(bundle.spec)
                owner = self._sandbox is None
                self._ensure_sandbox(request.id, bundle.spec)
                if owner:
                    undo.callback(self._close_sandbox)
                sandbox = self._sandbox
                shared = sandbox.dir / "shared"
                share_container_files(shared, request.id, bundle)
                undo.callback(unshare_container_files, shared, request.id)
                fit_guest_to(sandbox.dir, request.id, (bundle.spec.get("linux") or {}).get("resources") or {})
                guest_pids = {} if owner else {os.getpid(): self._sandbox_guest_pid}
                guest_pid = self._agent.create_container(
                    request.id, guest_spec(bundle.spec, request.id, guest_pids, owns_guest=owner))
                undo.callback(self._remove_in_guest, request.id)
                init = ShimProcess(request.id, "", os.getpid(),
                                   IOPaths(request.stdin, request.stdout, request.stderr, request.terminal))
                init.io = ProcessIO(sandbox.vsock_address, request.id, "", init.io_paths).start()
                undo.callback(init.io.close)
                state = hook_state(request.id, "created", init.pid, str(bundle_dir), bundle.spec.get("annotations"))
                for kind in CREATE_HOOKS:
                    run_hooks(hooks, kind, state)
                if owner:
                    self._sandbox_guest_pid = guest_pid
                    addresses = loopback_nameservers(bundle.spec) if network_namespace_path(bundle.spec) else []
                    if addresses:
                        sandbox.relay_dns(network_namespace_path(bundle.spec), addresses)
                task = Task(request.id, bundle_dir, bundle.spec, init, rootfs_mounted=mounted)
                self._tasks[request.id] = task
                undo.pop_all()
            self._watch_exit(task, init)
            self._events.publish("/tasks/create", events.TaskCreate(
                container_id=request.id, bundle=request.bundle, rootfs=request.rootfs,
                io=events.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                                 terminal=request.terminal),
                pid=init.pid))
            return shim.CreateTaskResponse(pid=init.pid)

    def _remove_in_guest(self, task_id: str) -> None:
        with contextlib.suppress(AgentError):
            if self._agent is not None:
                self._agent.remove_container(task_id, force=True)

    def Start(self, request: shim.StartRequest) -> shim.StartResponse:
        with self._lock:
            task, process = self._process(request.id, request.exec_id)
            if process.status != CREATED:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, f"process {process.id!r} is not created")
            if not request.exec_id:
                self._agent.start_container(task.id)
                process.status = RUNNING
                self._events.publish("/tasks/start", events.TaskStart(container_id=task.id, pid=process.pid))
                run_hooks_logging_failures(parse_hooks(task.spec), "poststart",
                                           hook_state(task.id, "running", process.pid, str(task.bundle),
                                                      task.spec.get("annotations")))
                return shim.StartResponse(pid=process.pid)
            self._agent.exec_process(task.id, request.exec_id, guest_process(process.spec))
            process.status = RUNNING
            try:
                process.io = ProcessIO(self._sandbox.vsock_address, task.id, request.exec_id, process.io_paths).start()
            except BaseException:
                with contextlib.suppress(AgentError):
                    self._agent.signal_process(task.id, 9, request.exec_id)
                raise
            self._watch_exit(task, process)
            self._events.publish("/tasks/exec-started", events.TaskExecStarted(
                container_id=task.id, exec_id=request.exec_id, pid=process.pid))
            return shim.StartResponse(pid=process.pid)

    def _watch_exit(self, task: Task, process: ShimProcess) -> None:
        """Wait for the process in the guest; then its last output, then its exit event."""
        agent = self._agent

        def wait() -> None:
            try:
                exited = agent.wait_exit(task.id, process.exec_id)
                status = exited.exit_status
                # Before the exit: CRI reads a container's OOM event as its reason to have ended.
                self._tell_oom(task.id, exited.oom_kills)
            except AgentError as exc:
                log.debug("waiting for %s: %s", process.id, exc)
                status = _KILLED
            if process.io is not None:
                drained = threading.Thread(target=process.io.wait_output, daemon=True)
                drained.start()
                drained.join(_OUTPUT_GRACE)
            if process.mark_exited(status):
                self._events.publish("/tasks/exit", events.TaskExit(
                    container_id=task.id, id=process.id, pid=process.pid, exit_status=status,
                    exited_at=timestamp(process.exited_at)))

        threading.Thread(target=wait, name=f"wait-{process.id[:16]}", daemon=True).start()

    def Delete(self, request: shim.DeleteRequest) -> shim.DeleteResponse:
        with self._lock:
            task, process = self._process(request.id, request.exec_id)
            if process.status in (RUNNING, PAUSED) and not process.exited:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, f"process {process.id!r} is still running")
            if process.io is not None:
                process.io.close()
            response = shim.DeleteResponse(pid=process.pid, exit_status=process.exit_status,
                                           exited_at=timestamp(process.exited_at))
            if request.exec_id:
                del task.execs[request.exec_id]
                return response
            self._remove_in_guest(task.id)
            if self._sandbox is not None:
                unshare_container_files(self._sandbox.dir / "shared", task.id)
                forget_guest_share(self._sandbox.dir, task.id)
            if task.rootfs_mounted:
                unmount_rootfs(task.bundle)
            del self._tasks[task.id]
            self._ooms_told.pop(task.id, None)
            run_hooks_logging_failures(parse_hooks(task.spec), "poststop",
                                       hook_state(task.id, "stopped", process.pid, str(task.bundle),
                                                  task.spec.get("annotations")))
            if not self._tasks:
                self._close_sandbox()  # the pod's last task: its guest goes now
            self._events.publish("/tasks/delete", events.TaskDelete(
                container_id=task.id, pid=process.pid, exit_status=process.exit_status,
                exited_at=response.exited_at, id=task.id))
            return response

    def Exec(self, request: shim.ExecProcessRequest) -> empty_pb2.Empty:
        with self._lock:
            task = self._task(request.id)
            if request.exec_id in task.execs:
                raise ttrpc.TtrpcError(ttrpc.ALREADY_EXISTS, f"process {request.exec_id!r} already exists")
            if task.init.exited:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, f"task {task.id!r} has stopped")
            try:
                spec = json.loads(request.spec.value or b"{}")
            except ValueError:
                raise ttrpc.TtrpcError(ttrpc.INVALID_ARGUMENT, "the exec's process is not JSON") from None
            if not isinstance(spec, dict) or not spec.get("args"):
                raise ttrpc.TtrpcError(ttrpc.INVALID_ARGUMENT, "the exec's process has no args")
            spec["terminal"] = request.terminal
            task.execs[request.exec_id] = ShimProcess(
                task.id, request.exec_id, os.getpid(),
                IOPaths(request.stdin, request.stdout, request.stderr, request.terminal), spec=spec)
            self._events.publish("/tasks/exec-added", events.TaskExecAdded(container_id=task.id,
                                                                            exec_id=request.exec_id))
            return empty_pb2.Empty()

    def Wait(self, request: shim.WaitRequest) -> shim.WaitResponse:
        with self._lock:
            _, process = self._process(request.id, request.exec_id)
        process.wait()  # without the lock: other calls go on meanwhile
        return shim.WaitResponse(exit_status=process.exit_status, exited_at=timestamp(process.exited_at))

    def Kill(self, request: shim.KillRequest) -> empty_pb2.Empty:
        with self._lock:
            task, process = self._process(request.id, request.exec_id)
            if process.exited:
                raise ttrpc.TtrpcError(ttrpc.NOT_FOUND, f"process {process.id!r} already finished")
            if process.status == CREATED and request.exec_id:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, f"process {process.id!r} is not started")
            self._agent.signal_process(task.id, request.signal, request.exec_id, all_processes=request.all)
            return empty_pb2.Empty()

    def State(self, request: shim.StateRequest) -> shim.StateResponse:
        with self._lock:
            task, process = self._process(request.id, request.exec_id)
            return shim.StateResponse(
                id=process.id, bundle=str(task.bundle), pid=process.pid, status=process.status,
                stdin=process.io_paths.stdin, stdout=process.io_paths.stdout, stderr=process.io_paths.stderr,
                terminal=process.io_paths.terminal, exit_status=process.exit_status,
                exited_at=timestamp(process.exited_at) if process.exited_at else None, exec_id=request.exec_id)

    def Pids(self, request: shim.PidsRequest) -> shim.PidsResponse:
        with self._lock:
            task = self._task(request.id)
            agent = self._agent
        processes = agent.list_processes(task.id)
        return shim.PidsResponse(processes=[task_types.ProcessInfo(pid=p.pid) for p in processes])

    def Pause(self, request: shim.PauseRequest) -> empty_pb2.Empty:
        return self._set_paused(request.id, True)

    def Resume(self, request: shim.ResumeRequest) -> empty_pb2.Empty:
        return self._set_paused(request.id, False)

    def _set_paused(self, task_id: str, paused: bool) -> empty_pb2.Empty:
        with self._lock:
            task = self._task(task_id)
            if task.init.exited or task.init.status == CREATED:
                raise ttrpc.TtrpcError(ttrpc.FAILED_PRECONDITION, f"task {task_id!r} is not running")
            if paused:
                self._agent.pause_container(task_id)
                task.init.status = PAUSED
                self._events.publish("/tasks/paused", events.TaskPaused(container_id=task_id))
            else:
                self._agent.resume_container(task_id)
                task.init.status = RUNNING
                self._events.publish("/tasks/resumed", events.TaskResumed(container_id=task_id))
            return empty_pb2.Empty()

    def Checkpoint(self, request: shim.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise ttrpc.TtrpcError(ttrpc.UNIMPLEMENTED, "checkpoint is not implemented by vmrun")

    def ResizePty(self, request: shim.ResizePtyRequest) -> empty_pb2.Empty:
        with self._lock:
            task, process = self._process(request.id, request.exec_id)
            if not process.exited:
                self._agent.resize_tty(task.id, request.height, request.width, request.exec_id)
            return empty_pb2.Empty()

    def CloseIO(self, request: shim.CloseIORequest) -> empty_pb2.Empty:
        with self._lock:
            _, process = self._process(request.id, request.exec_id)
            io = process.io
        if request.stdin and io is not None:
            io.close_stdin()
        return empty_pb2.Empty()

    def Update(self, request: shim.UpdateTaskRequest) -> empty_pb2.Empty:
        with self._lock:
            task = self._task(request.id)
            try:
                resources = json.loads(request.resources.value or b"{}")
            except ValueError:
                raise ttrpc.TtrpcError(ttrpc.INVALID_ARGUMENT, "the resources are not JSON") from None
            if not isinstance(resources, dict):
                raise ttrpc.TtrpcError(ttrpc.INVALID_ARGUMENT, "the resources are not a JSON object")
            fit_guest_to(self._sandbox.dir, task.id, resources)
            self._agent.update_container(task.id, resources)
            return empty_pb2.Empty()

    def Stats(self, request: shim.StatsRequest) -> shim.StatsResponse:
        with self._lock:
            task = self._task(request.id)
            agent = self._agent
        return shim.StatsResponse(stats=to_any(metrics_from_stats(agent.stats(task.id))))

    def Connect(self, request: shim.ConnectRequest) -> shim.ConnectResponse:
        return shim.ConnectResponse(shim_pid=os.getpid(), task_pid=os.getpid(), version=vmrun.__version__)

    def Shutdown(self, request: shim.ShutdownRequest) -> empty_pb2.Empty:
        with self._lock:
            if self._tasks and not request.now:
                return empty_pb2.Empty()  # one shim per pod: its other tasks keep it
        self._on_shutdown()
        return empty_pb2.Empty()
