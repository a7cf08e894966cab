"""`vmrun run`: one container in its own guest, in the foreground, like `runc run`."""

from __future__ import annotations

import logging
import os
import sys
import time

from vmrun.common import linux
from vmrun.config import Config
from vmrun.errors import AgentError, HypervisorError
from vmrun.hooks import CREATE_HOOKS, Hook, hook_state, parse_hooks, run_hooks, run_hooks_logging_failures
from vmrun.host_cgroup import cgroup_path, joined
from vmrun.namespaces import NAMESPACE_FLAGS
from vmrun.network.container_netns import make_container_netns, remove_container_netns
from vmrun.network.dns_relay import loopback_nameservers
from vmrun.network.netns import check_netns
from vmrun.oci import Bundle, guest_spec, load_bundle, network_namespace_path, validate_id, wants_new_network_namespace
from vmrun.sandbox import Sandbox
from vmrun.state import ContainerState, StateStore, write_pid_file
from vmrun.signals import interrupted_by_signals
from vmrun.sizing import fit_guest_to

log = logging.getLogger("vmrun.run")


def run_container(config: Config, store: StateStore, bundle_dir: str, container_id: str, pid_file: str = "") -> int:
    """Boot a guest, run the bundle's process in it, relay stdio; its exit status."""
    validate_id(container_id)
    bundle = load_bundle(bundle_dir)
    netns = network_namespace_path(bundle.spec)
    if netns:
        check_netns(netns)  # before a guest boots for nothing
    cgroup = cgroup_path(bundle.spec)
    # This process holds the guest (as a sandbox daemon would) and stands for the container.
    state = ContainerState(container_id, str(bundle.path), str(bundle.rootfs), "creating", pid=os.getpid(),
                           annotations=bundle.spec.get("annotations") or {}, sandbox_id=container_id,
                           daemon_pid=os.getpid())
    store.create(state)
    own_netns = None
    try:
        if pid_file:
            write_pid_file(pid_file, os.getpid())
        if not netns and wants_new_network_namespace(bundle.spec):
            # This process stands for the container: as with runc, its pid's network
            # namespace is the container's own (hooks configure it); carried into the guest.
            own_netns = config.run_dir / "netns" / container_id
            state.host_netns = str(own_netns)
            store.save(state)  # recorded first: a delete after a kill removes it
            make_container_netns(own_netns)
            _enter_netns(own_netns)
            netns = str(own_netns)
        # Until the process runs, a stop signal unwinds (and so cleans up) instead of killing us.
        with interrupted_by_signals(), joined(cgroup):
            return _run_in_guest(config, store, bundle, state, netns, attach_at_boot=own_netns is None)
    finally:
        if own_netns is not None:
            remove_container_netns(own_netns)
        store.remove(container_id)


def _enter_netns(path: os.PathLike[str]) -> None:
    # The main thread's namespace is the one /proc/<pid>/ns/net shows; the helpers this
    # process starts (QEMU and the rest) use no host network.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, NAMESPACE_FLAGS["network"])
    finally:
        os.close(fd)


def _run_in_guest(config: Config, store: StateStore, bundle: Bundle, state: ContainerState, netns: str,
                  attach_at_boot: bool) -> int:
    container_id = state.id
    hooks = parse_hooks(bundle.spec)
    has_create_hooks = any(hooks.get(kind) for kind in CREATE_HOOKS)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    with Sandbox(container_id, config, hostname=bundle.spec.get("hostname", "")) as sandbox:
        assert sandbox.agent is not None
        agent = sandbox.agent
        state.vm_dir = str(sandbox.dir)
        store.save(state)
        if netns and attach_at_boot:
            sandbox.attach_network(netns)
        sandbox.share_container(container_id, bundle)
        fit_guest_to(sandbox.dir, container_id, (bundle.spec.get("linux") or {}).get("resources") or {})
        # After the sandbox: see Sandbox._boot on imports.
        from vmrun.stdio import caller_terminal_fd, console_size, relay_until_exit

        spec = guest_spec(bundle.spec, container_id)
        if bundle.terminal and "consoleSize" not in spec["process"]:
            size = console_size(caller_terminal_fd())
            if size:
                spec["process"]["consoleSize"] = size
        if has_create_hooks:
            agent.create_container(container_id, spec)
            _run_create_hooks(hooks, state)
            if netns and not attach_at_boot:
                sandbox.attach_network(netns)  # what the hooks put in the container's namespace
            _relay_loopback_dns(sandbox, bundle, netns)
            agent.start_container(container_id)
        else:
            _relay_loopback_dns(sandbox, bundle, netns)
            # Created and started in one step: the output waits in the guest until relayed.
            agent.create_container(container_id, spec, start=True)
        state.status = "running"
        store.save(state)
        run_hooks_logging_failures(hooks, "poststart", _hook_state(state))
        timings["container_started"] = time.monotonic() - t0
        try:
            code = relay_until_exit(sandbox.vsock_address, container_id, stdin=sys.stdin.fileno(), stdout=sys.stdout.fileno(),
                                    stderr=sys.stderr.fileno(), terminal=bundle.terminal,
                                    follow_caller_terminal=True)
        except AgentError:
            if sandbox.helper_death:  # why the agent went: say that
                raise HypervisorError(f"{sandbox.helper_death}, and the guest with it") from None
            raise
        timings["container_exited"] = time.monotonic() - t0
        state.status = "stopped"
        store.save(state)
        # No crun delete in the guest: the guest itself goes now.
        boot = dict(sandbox.timings)
        guest = {f"guest_{k}": v for k, v in sandbox.guest_timings.items()}
    run_hooks_logging_failures(hooks, "poststop", _hook_state(state))
    timings["torn_down"] = time.monotonic() - t0
    log.debug("timings %s", " ".join(f"{k}={v:.3f}" for k, v in {**boot, **timings}.items()))
    log.debug("guest timings %s", " ".join(f"{k}={v:.3f}" for k, v in guest.items()))
    return code


def _hook_state(state: ContainerState) -> dict:
    return hook_state(state.id, state.status, state.pid, state.bundle, state.annotations)


def _run_create_hooks(hooks: dict[str, list[Hook]], state: ContainerState) -> None:
    for kind in CREATE_HOOKS:
        run_hooks(hooks, kind, _hook_state(state))


def _relay_loopback_dns(sandbox: Sandbox, bundle: Bundle, netns: str) -> None:
    """As Containers._relay_loopback_dns: loopback name servers of the container's namespace."""
    addresses = loopback_nameservers(bundle.spec) if netns else []
    if addresses:
        sandbox.relay_dns(netns, addresses)
