"""runc's container life cycle across CLI calls: create, start, exec, kill, delete, ...

A container's guest is held by a sandbox daemon (started by the create of the container
that owns the guest: a pod's sandbox, or a container with no pod); each container's init
and each exec is stood for on the host by a shim whose pid the caller gets.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from vmrun.config import Config
from vmrun.errors import AgentError, AgentGoneError, ContainerNotFoundError, StateConflictError, VmrunError
from vmrun.control import CONTROL_SOCKET, control_call
from vmrun.hooks import CREATE_HOOKS, hook_state, parse_hooks, run_hooks, run_hooks_logging_failures
from vmrun.host_cgroup import HostCgroup, cgroup_path, process_tree
from vmrun.network.container_netns import make_container_netns, remove_container_netns
from vmrun.network.dns_relay import loopback_nameservers
from vmrun.network.netns import check_netns
from vmrun.oci import (Bundle, guest_process, guest_spec, load_bundle, network_namespace_path, validate_id,
                       wants_new_network_namespace)
from vmrun.orphans import reclaim_orphaned
from vmrun.pod import placement
from vmrun.pool import take_from_pool
from vmrun.process_ref import ProcessRef, wait_until_gone
from vmrun.runc_stats import runc_stats
from vmrun.sandbox import vm_dir_for
from vmrun.sandbox_daemon import adopt_sandbox_daemon, spawn_sandbox_daemon, stop_sandbox_daemon
from vmrun.share import share_container_files, unshare_container_files
from vmrun.shim import StartingShim, spawn_shim
from vmrun.sizing import fit_guest_to, forget_guest_share
from vmrun.state import ContainerState, StateStore, write_pid_file
from vmrun.signals import interrupted_by_signals
from vmrun.threads import InThread

if TYPE_CHECKING:
    from vmrun.agent.client import AgentClient

_SHIM_EXIT_GRACE = 5.0
# Hooks run after create returns: the state keeps them (the bundle may be gone by then).
_LATER_HOOKS = ("poststart", "poststop")


def _wait_gone(processes: list[ProcessRef], timeout: float) -> None:
    # Only our own processes: ProcessRef signals none whose pid another process took over.
    for process in wait_until_gone(processes, timeout):
        process.signal(signal.SIGKILL)


# How long `kill` waits, when the guest went mid-call, for the container's host process to
# follow it (its relay reads the exit, then ends).
KILLED_GUEST_GRACE_S = 10.0


@dataclass
class Containers:
    config: Config
    store: StateStore

    def _agent(self, state: ContainerState) -> AgentClient:
        # Imported here: gRPC and protobuf take ~70 ms, and a delete or kill of a container
        # that has already stopped never calls the guest.
        from vmrun.agent.client import AgentClient

        return AgentClient(state.agent_socket, call_timeout=30.0)

    def _remove_in_guest(self, state: ContainerState) -> None:
        try:
            with self._agent(state) as agent:
                agent.remove_container(state.id, force=True)
        except AgentError:
            pass  # the guest is gone, or never had it: nothing left in it to remove

    def _running_state(self, container_id: str, action: str) -> ContainerState:
        state = self.store.load(container_id)
        status = state.live_status()
        if status not in ("running", "paused", "created"):
            raise StateConflictError(f"cannot {action} container {container_id!r}: it is {status}")
        return state

    # ---- create / start ----

    def create(self, container_id: str, bundle_dir: str, pid_file: str = "", console_socket: str = "") -> None:
        validate_id(container_id)
        bundle = load_bundle(bundle_dir)
        if bundle.terminal and not console_socket:
            raise VmrunError("process.terminal is set: --console-socket is required")
        if bundle.terminal:
            _check_console_socket(console_socket)
        annotations = bundle.spec.get("annotations") or {}
        place = placement(container_id, annotations)
        # Until the shim stands for it, this process does: if it dies, the state reads stopped.
        hooks = bundle.spec.get("hooks") or {}
        state = ContainerState(container_id, str(bundle.path), str(bundle.rootfs), "creating",
                               annotations=annotations, sandbox_id=place.sandbox_id,
                               host_cgroup=cgroup_path(bundle.spec) if place.owns_guest else "",
                               shim_cgroup=cgroup_path(bundle.spec),
                               hooks={kind: hooks[kind] for kind in _LATER_HOOKS if hooks.get(kind)})
        state.process = ProcessRef.of(os.getpid())
        guest_pids: dict[int, int] = {}
        with contextlib.ExitStack() as pod_lock:
            if not place.owns_guest:
                # Held while we join: the pod's delete waits until we are recorded.
                try:
                    pod_lock.enter_context(self.store.locked(place.sandbox_id))
                    pod = self.store.load(place.sandbox_id)
                except ContainerNotFoundError:
                    raise VmrunError(f"the sandbox {place.sandbox_id!r} of container {container_id!r} "
                                     "does not exist") from None
                if not pod.daemon.alive():
                    raise StateConflictError(f"the guest of sandbox {place.sandbox_id!r} is gone")
                state.vm_dir = pod.vm_dir
                guest_pids[pod.pid] = pod.guest_pid
            self._create(state, bundle, place.owns_guest, guest_pids, pid_file, console_socket)

    def _create(self, state: ContainerState, bundle: Bundle, owns_guest: bool, guest_pids: dict[int, int],
                pid_file: str, console_socket: str) -> None:
        container_id = state.id
        self.store.create(state)
        with contextlib.ExitStack() as undo, self.store.locked(container_id), interrupted_by_signals():
            undo.callback(self.store.remove, container_id)

            def start_shim() -> StartingShim:
                if state.shim_cgroup:
                    undo.callback(HostCgroup(state.shim_cgroup).remove)  # once the shim has gone
                shim = StartingShim(state.vm_dir, container_id, console_socket=console_socket,
                                    netns=state.host_netns)
                undo.callback(shim.close)
                if state.shim_cgroup:
                    # What stands for the container on the host counts where its caller looks.
                    HostCgroup(state.shim_cgroup).join([shim.pid])
                return shim

            shim: StartingShim | None = None
            if owns_guest:
                hostname = bundle.spec.get("hostname", "")
                netns = network_namespace_path(bundle.spec)
                if netns:
                    check_netns(netns)
                elif wants_new_network_namespace(bundle.spec):
                    # Removed after the daemon (undone in reverse), which may hold NICs in it.
                    state.host_netns = str(make_container_netns(self._netns_path(container_id)))
                    undo.callback(remove_container_netns, Path(state.host_netns))
                    self.store.save(state)
                pooled = take_from_pool(self.config)
                if pooled is not None:
                    state.vm_dir, state.daemon = pooled.vm_dir, pooled.daemon
                else:
                    # Recorded before it boots: if we die meanwhile, delete cleans it up.
                    state.vm_dir = str(vm_dir_for(self.config, container_id))
                    self.store.save(state)
                    # The shim, and the agent client (gRPC) this process needs once the guest
                    # is up, load while it boots (an import failure shows again at its use).
                    shim = start_shim()
                    InThread(lambda: importlib.import_module("vmrun.agent.client"), "agent-client-import")
                    state.daemon = spawn_sandbox_daemon(container_id, Path(state.vm_dir), hostname,
                                                        self.config.boot_timeout, netns, state.host_cgroup)
                undo.callback(stop_sandbox_daemon, state.daemon, Path(state.vm_dir), state.host_cgroup)
                if pooled is not None and state.host_cgroup:
                    # Started before its pod was known: it and its helpers move there now.
                    if not pooled.daemon.alive():
                        raise StateConflictError("the pooled guest's daemon is gone")
                    HostCgroup(state.host_cgroup).join(process_tree(pooled.daemon.pid))
                self.store.save(state)
                adopt_sandbox_daemon(state.daemon)
                if pooled is not None:
                    with self._agent(state) as agent:
                        agent.refresh_guest(hostname)
                    if netns:
                        # The daemon holding the pooled guest's QEMU plugs the pod's NICs.
                        control_call(Path(state.vm_dir) / CONTROL_SOCKET, "network-add", netns=netns)
            if shim is None:
                shim = start_shim()  # it loads while the container is made
            shared = Path(state.vm_dir) / "shared"
            share_container_files(shared, container_id, bundle)
            undo.callback(unshare_container_files, shared, container_id)
            fit_guest_to(Path(state.vm_dir), container_id, (bundle.spec.get("linux") or {}).get("resources") or {})
            with self._agent(state) as agent:
                state.guest_pid = agent.create_container(
                    container_id, guest_spec(bundle.spec, container_id, guest_pids, owns_guest=owns_guest))
                undo.callback(self._remove_in_guest, state)
                # Taken while the shim is our child, not yet reaped: its pid is still its own.
                state.process = ProcessRef.of(shim.go())
                self._run_create_hooks(state, bundle)
                if owns_guest:
                    self._relay_loopback_dns(state, bundle)
                if pid_file:
                    write_pid_file(pid_file, state.pid)
                state.status = "created"
                self.store.save(state)
                undo.pop_all()

    def _netns_path(self, container_id: str) -> Path:
        # Beside the guests' directories, not in one: a sandbox's directory is made by its daemon.
        return self.config.run_dir / "netns" / container_id

    def _run_create_hooks(self, state: ContainerState, bundle: Bundle) -> None:
        """prestart, createRuntime, createContainer: the container exists in the guest and its
        process has not started. Then what they put in the container's network namespace
        (dockerd's network) goes into the guest."""
        hooks = parse_hooks(bundle.spec)
        if not any(hooks.get(kind) for kind in CREATE_HOOKS):
            return
        hook_input = hook_state(state.id, "creating", state.pid, state.bundle, state.annotations)
        for kind in CREATE_HOOKS:
            run_hooks(hooks, kind, hook_input)
        if state.host_netns:
            # Watched from now on: dockerd connects and disconnects networks while it runs.
            control_call(Path(state.vm_dir) / CONTROL_SOCKET, "network-add", netns=state.host_netns, watch=True)

    def _relay_loopback_dns(self, state: ContainerState, bundle: Bundle) -> None:
        """A name server on the loopback of the container's host namespace (dockerd's
        127.0.0.11) is answered in the guest through the DNS relay."""
        netns = state.host_netns or network_namespace_path(bundle.spec)
        addresses = loopback_nameservers(bundle.spec) if netns else []
        if addresses:
            control_call(Path(state.vm_dir) / CONTROL_SOCKET, "dns-relay", netns=netns, addresses=addresses)

    def _run_later_hooks(self, state: ContainerState, kind: str, status: str) -> None:
        hooks = parse_hooks({"hooks": state.hooks})
        if hooks.get(kind):
            run_hooks_logging_failures(hooks, kind,
                                       hook_state(state.id, status, state.pid, state.bundle, state.annotations))

    def start(self, container_id: str) -> None:
        with self.store.locked(container_id):
            state = self.store.load(container_id)
            status = state.live_status()
            if status != "created":
                raise StateConflictError(f"cannot start container {container_id!r}: it is {status}, not created")
            with self._agent(state) as agent:
                agent.start_container(container_id)
            state.status = "running"
            self.store.save(state)
            self._run_later_hooks(state, "poststart", "running")

    # ---- signals, delete ----

    def kill(self, container_id: str, signum: int, all_processes: bool = False) -> None:
        state = self.store.load(container_id)
        reclaim_orphaned(self.config, self.store, [state])
        if state.live_status() == "creating":
            raise StateConflictError(f"container {container_id!r} is being created")
        if state.live_status() == "stopped":
            if all_processes:
                return  # as runc: nothing left to signal is not an error with --all
            raise StateConflictError(f"container {container_id!r} is not running")
        if signum == 0:
            return  # as kill(2) and runc: only whether there is a process to signal
        try:
            with self._agent(state) as agent:
                agent.signal_process(container_id, signum, all_processes=all_processes)
        except AgentGoneError:
            # A signal that ends a pod's last container can take the guest down before the
            # agent's reply is out: the container is then gone, and the signal was delivered.
            if wait_until_gone([state.process], timeout=KILLED_GUEST_GRACE_S):
                raise

    def delete(self, container_id: str, force: bool = False) -> None:
        validate_id(container_id)
        try:
            with self.store.locked(container_id):
                self._delete_locked(container_id, force)
        except ContainerNotFoundError:
            # As runc: a directory without a state (a create that died early) goes, and
            # forcing the delete of what is not there succeeds.
            self.store.remove_debris(container_id)
            if force:
                return
            raise

    def _delete_locked(self, container_id: str, force: bool) -> None:
        state = self.store.load(container_id)
        status = state.live_status()
        if status == "creating":
            raise StateConflictError(f"container {container_id!r} is being created")
        if status in ("running", "paused") and not force:
            raise StateConflictError(f"cannot delete container {container_id!r} that is {status}: use --force")
        if state.vm_dir and (state.daemon.alive() or not state.owns_guest):
            self._remove_in_guest(state)
            if not state.owns_guest:
                forget_guest_share(Path(state.vm_dir), container_id)  # its limits no longer count
        _wait_gone([state.process, *state.execs.values()], _SHIM_EXIT_GRACE)
        if state.vm_dir:
            unshare_container_files(Path(state.vm_dir) / "shared", container_id)
            if state.owns_guest:
                stop_sandbox_daemon(state.daemon, Path(state.vm_dir), state.host_cgroup)
        if state.host_netns:
            remove_container_netns(Path(state.host_netns))
        if state.shim_cgroup:
            HostCgroup(state.shim_cgroup).remove()
        self._run_later_hooks(state, "poststop", "stopped")
        self.store.remove(container_id)

    # ---- exec ----

    def exec(self, container_id: str, process: dict, *, detach: bool, pid_file: str = "",
             console_socket: str = "") -> int:
        """Run `process` in the container; with detach, return at once (0), else its status."""
        state = self._running_state(container_id, "exec in")
        terminal = bool(process.get("terminal"))
        if terminal and detach and not console_socket:
            raise VmrunError("--tty with --detach needs --console-socket")
        if terminal and console_socket:
            _check_console_socket(console_socket)
        exec_id = "exec-" + secrets.token_hex(8)
        if terminal and not detach and "consoleSize" not in process:
            from vmrun.stdio import caller_terminal_fd, console_size

            size = console_size(caller_terminal_fd())
            process = {**process, "consoleSize": size} if size else process
        with self._agent(state) as agent:
            agent.exec_process(container_id, exec_id, guest_process(process))
            if not detach:
                from vmrun.stdio import relay_until_exit

                return relay_until_exit(state.vsock_address(), container_id, exec_id, stdin=sys.stdin.fileno(),
                                        stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno(), terminal=terminal,
                                        follow_caller_terminal=True)
        try:
            # Taken while the shim is our child, not yet reaped: its pid is still its own.
            shim = ProcessRef.of(spawn_shim(state.vm_dir, container_id, exec_id, console_socket=console_socket,
                                            netns=state.host_netns, cgroup=state.shim_cgroup))
        except BaseException:
            with contextlib.suppress(AgentError), self._agent(state) as agent:
                agent.signal_process(container_id, signal.SIGKILL, exec_id)  # nobody would stand for it
            raise
        if pid_file:
            write_pid_file(pid_file, shim.pid)
        with self.store.locked(container_id):
            state = self.store.load(container_id)
            state.execs = {k: v for k, v in state.execs.items() if v.alive()}
            state.execs[exec_id] = shim
            self.store.save(state)
        return 0

    # ---- the pod's network (as `kata-runtime kata-network` did) ----

    def _control_socket(self, container_id: str) -> tuple[ContainerState, Path]:
        state = self._running_state(container_id, "change the network of")
        return state, Path(state.vm_dir) / CONTROL_SOCKET

    def network_add(self, container_id: str, netns: str = "") -> list[str]:
        """Plug the pod interfaces that the guest lacks (say, a second CNI ADD); their names."""
        state, control = self._control_socket(container_id)
        netns = netns or state.host_netns or network_namespace_path(load_bundle(state.bundle).spec)
        if not netns:
            raise VmrunError(f"container {container_id!r} joins no network namespace: give --netns")
        return list(control_call(control, "network-add", netns=netns))  # type: ignore[arg-type]

    def network_rm(self, container_id: str, interface: str) -> None:
        _, control = self._control_socket(container_id)
        control_call(control, "network-rm", name=interface)

    def network_ls(self, container_id: str) -> list[dict]:
        _, control = self._control_socket(container_id)
        return list(control_call(control, "network-ls"))  # type: ignore[arg-type]

    # ---- inspection and control ----

    def host_pids(self, container_id: str) -> list[int]:
        """The host processes standing for the container's processes (init, then execs)."""
        state = self.store.load(container_id)
        return [process.pid for process in (state.process, *state.execs.values()) if process.alive()]

    def processes(self, container_id: str) -> list:
        """The container's processes as the guest sees them (agent ProcessInfo messages)."""
        state = self._running_state(container_id, "list the processes of")
        with self._agent(state) as agent:
            return agent.list_processes(container_id)

    def pause(self, container_id: str) -> None:
        self._set_paused(container_id, True)

    def resume(self, container_id: str) -> None:
        self._set_paused(container_id, False)

    def _set_paused(self, container_id: str, paused: bool) -> None:
        with self.store.locked(container_id):
            state = self._running_state(container_id, "pause" if paused else "resume")
            if (state.status == "paused") == paused:
                raise StateConflictError(f"container {container_id!r} is {'already' if paused else 'not'} paused")
            with self._agent(state) as agent:
                (agent.pause_container if paused else agent.resume_container)(container_id)
            # A created container paused and resumed is still created (not started).
            state.paused_from, state.status = (state.status, "paused") if paused else ("", state.paused_from)
            self.store.save(state)

    def stats(self, container_id: str) -> dict:
        """The container's resource usage, in the shape `runc events --stats` prints."""
        state = self._running_state(container_id, "read the statistics of")
        with self._agent(state) as agent:
            stats = agent.stats(container_id)
        try:
            detail = json.loads(stats.cgroup_stats_json or b"{}")
        except ValueError:
            detail = {}  # the guest's to get wrong: its counters are then absent
        return runc_stats(cpu_usage_ns=stats.cpu_usage_ns, memory_usage=stats.memory_usage_bytes,
                          memory_limit=stats.memory_limit_bytes, pids_current=stats.pids_current, detail=detail)

    def watch_oom(self, container_id: str) -> Iterator[None]:
        """One item per OOM kill in the container, as it happens, until the guest goes.
        Only a rising count is news: a guest repeating itself prints nothing more."""
        state = self._running_state(container_id, "watch the events of")
        told = 0
        with self._agent(state) as agent:
            try:
                for event in agent.watch_oom():
                    if event.container_id == container_id and event.oom_kills > told:
                        told = event.oom_kills
                        yield None
            except AgentError:
                return

    def update(self, container_id: str, resources: dict) -> None:
        state = self._running_state(container_id, "update")
        fit_guest_to(Path(state.vm_dir), container_id, resources)
        with self._agent(state) as agent:
            agent.update_container(container_id, resources)


def _check_console_socket(path: str) -> None:
    """Refuse a console socket that is not one before anything starts (runc dials it
    first; our shim sends the terminal there only once the guest has made it)."""
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as exc:
        raise VmrunError(f"cannot use console socket {path}: {exc.strerror}") from None
    if not is_socket:
        raise VmrunError(f"cannot use console socket {path}: not a socket")


def exec_process_from_args(spec: dict, args: list[str], *, cwd: str = "", env: list[str] = (),
                           user: str = "", tty: bool = False) -> dict:
    """An exec's process built as runc does without --process: the container's, overridden."""
    if not args:
        raise VmrunError("exec: no command given (pass arguments or --process)")
    process = json.loads(json.dumps(spec.get("process", {})))
    process["args"] = list(args)
    process["terminal"] = tty
    if cwd:
        process["cwd"] = cwd
    if env:
        process["env"] = [*process.get("env", []), *env]
    if user:
        uid, _, gid = user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise VmrunError(f"exec: --user takes uid[:gid], not {user!r}") from None
    return process
