"""`vmrun run`: one container in its own guest, in the foreground, like `runc run`."""

from __future__ import annotations

import logging
import os
import sys
import termios
import time
import tty
from contextlib import contextmanager, nullcontext
from typing import Iterator

from vmrun.config import Config
from vmrun.host_cgroup import cgroup_path, joined
from vmrun.network.netns import check_netns
from vmrun.oci import Bundle, guest_spec, load_bundle, network_namespace_path, validate_id
from vmrun.sandbox import Sandbox
from vmrun.state import ContainerState, StateStore, write_pid_file
from vmrun.signals import interrupted_by_signals

log = logging.getLogger("vmrun.run")

@contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The caller's terminal in raw mode, so keys reach the guest's pty unchanged."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


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
    try:
        if pid_file:
            write_pid_file(pid_file, os.getpid())
        # Until the process runs, a stop signal unwinds (and so cleans up) instead of killing us.
        with interrupted_by_signals(), joined(cgroup):
            return _run_in_guest(config, store, bundle, state, netns)
    finally:
        store.remove(container_id)


def _run_in_guest(config: Config, store: StateStore, bundle: Bundle, state: ContainerState, netns: str) -> int:
    container_id = state.id
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    with Sandbox(container_id, config, hostname=bundle.spec.get("hostname", "")) as sandbox:
        assert sandbox.agent is not None
        agent = sandbox.agent
        state.vm_dir = str(sandbox.dir)
        store.save(state)
        if netns:
            sandbox.attach_network(netns)
        sandbox.share_container(container_id, bundle)
        from vmrun.stdio import relay_until_exit  # after the sandbox: see Sandbox._boot on imports

        # Created and started in one step: the output waits in the guest until relayed.
        agent.create_container(container_id, guest_spec(bundle.spec, container_id), start=True)
        state.status = "running"
        store.save(state)
        timings["container_started"] = time.monotonic() - t0
        with _raw_terminal(sys.stdin.fileno()) if bundle.terminal else nullcontext():
            code = relay_until_exit(agent, container_id, stdin=sys.stdin.fileno(), stdout=sys.stdout.fileno(),
                                    stderr=sys.stderr.fileno(), terminal=bundle.terminal)
        timings["container_exited"] = time.monotonic() - t0
        state.status = "stopped"
        store.save(state)
        # No crun delete in the guest: the guest itself goes now.
        boot = dict(sandbox.timings)
        guest = {f"guest_{k}": v for k, v in sandbox.guest_timings.items()}
    timings["torn_down"] = time.monotonic() - t0
    log.debug("timings %s", " ".join(f"{k}={v:.3f}" for k, v in {**boot, **timings}.items()))
    log.debug("guest timings %s", " ".join(f"{k}={v:.3f}" for k, v in guest.items()))
    return code
