"""`vmrun run`: one container in its own guest, in the foreground, like `runc run`."""

from __future__ import annotations

import logging
import os
import signal
import sys
import termios
import threading
import time
import tty
from contextlib import contextmanager
from typing import Iterator

from vmrun.config import Config
from vmrun.errors import AgentError
from vmrun.oci import guest_spec, load_bundle, validate_id
from vmrun.sandbox import Sandbox
from vmrun.state import ContainerState, StateStore
from vmrun.stdio import StdioRelay

log = logging.getLogger("vmrun.run")

# Signals a caller sends to `vmrun run` are meant for the container.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


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


@contextmanager
def _forward_signals(deliver) -> Iterator[None]:
    previous = {sig: signal.signal(sig, lambda signum, _frame: deliver(signum)) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_in_thread(wait) -> int:
    """Run a blocking wait in a thread so the main thread stays free for signal handlers."""
    result: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            result["code"] = wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc
        done.set()

    threading.Thread(target=target, daemon=True).start()
    while not done.wait(0.2):
        pass
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return int(result["code"])  # type: ignore[arg-type]


def run_container(config: Config, store: StateStore, bundle_dir: str, container_id: str) -> int:
    """Boot a guest, run the bundle's process in it, relay stdio; its exit status."""
    validate_id(container_id)
    bundle = load_bundle(bundle_dir)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    state = ContainerState(container_id, str(bundle.path), str(bundle.rootfs), "creating", pid=os.getpid(),
                           annotations=bundle.spec.get("annotations") or {})
    store.create(state)
    try:
        with Sandbox(container_id, config, hostname=bundle.spec.get("hostname", "")) as sandbox:
            assert sandbox.agent is not None
            agent = sandbox.agent
            state.vm_dir = str(sandbox.dir)
            sandbox.share_container(container_id, bundle)
            agent.create_container(container_id, guest_spec(bundle.spec, container_id))
            timings["container_created"] = time.monotonic() - t0
            relay = StdioRelay(agent, container_id, stdin=sys.stdin.fileno(), stdout=sys.stdout.fileno(),
                               stderr=sys.stderr.fileno(), terminal=bundle.terminal)
            with _raw_terminal(sys.stdin.fileno()) if bundle.terminal else _nothing():
                relay.start()
                agent.start_container(container_id)
                state.status = "running"
                store.save(state)
                timings["container_started"] = time.monotonic() - t0

                def deliver(signum: int) -> None:
                    try:
                        agent.signal_process(container_id, signum)
                    except AgentError as exc:
                        log.warning("could not forward signal %d: %s", signum, exc)

                with _forward_signals(deliver):
                    code = _wait_in_thread(lambda: agent.wait_process(container_id))
                relay.wait_output()
            timings["container_exited"] = time.monotonic() - t0
            state.status = "stopped"
            store.save(state)
            agent.remove_container(container_id, force=True)
            boot = dict(sandbox.timings)
            guest = {f"guest_{k}": v for k, v in sandbox.guest_timings.items()}
        timings["torn_down"] = time.monotonic() - t0
        log.debug("timings %s", " ".join(f"{k}={v:.3f}" for k, v in {**boot, **timings}.items()))
        log.debug("guest timings %s", " ".join(f"{k}={v:.3f}" for k, v in guest.items()))
        return code
    finally:
        store.remove(container_id)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
