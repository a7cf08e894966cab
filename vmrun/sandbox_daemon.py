"""The process that keeps a pod's guest alive between CLI calls.

`vmrun create` of a pod's first container starts it (`python -m vmrun.sandbox_daemon`);
it boots the guest, says READY on a pipe, and holds the Sandbox (QEMU, virtiofsd, the
vsock backend, the agent bridge) until SIGTERM — sent by the `delete` of the container
that owns the guest — or until QEMU dies. Its helpers die with it (PDEATHSIG), and the
Sandbox's close() undoes everything it made.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path

from vmrun.common.deferred_imports import defer_unused_grpc_modules
from vmrun.config import load_config
from vmrun.errors import VmrunError
from vmrun.host_cgroup import HostCgroup, joined
from vmrun.mounts import remove_tree_safely
from vmrun.proc import HelperProcess
from vmrun.ready_pipe import ReadyPipe
from vmrun.process_ref import ProcessRef, wait_until_gone
from vmrun.capped_log import LOG_LIMIT
from vmrun.hypervisor.virtiofsd import VIRTIOFSD_SOCKET, pid_file_for
from vmrun.log import TextFormatter, debugging
from vmrun.sandbox import Sandbox, daemon_log_for, vm_dir_for
from vmrun.signals import interrupted_by_signals

_STOP_GRACE = 10.0


def spawn_sandbox_daemon(sandbox_id: str, vm_dir: Path, hostname: str, boot_timeout: float, netns: str = "",
                         cgroup: str = "") -> ProcessRef:
    """Start the daemon for `sandbox_id` and wait until its guest is ready; the daemon. It
    and every helper of the guest run in the host cgroup `cgroup` (host_cgroup.py), if any.

    Until adopted (`adopt_sandbox_daemon`, once its starter has recorded it), the daemon
    goes when its starter goes: a `create` killed half-way, or a pool that stops, leaves
    no guest behind that nobody knows of.
    """
    ready = ReadyPipe()
    # As the CLI logs (--debug), so does the daemon, into its log (daemon_log_for).
    debug = ["--debug"] if debugging() else []
    daemon = HelperProcess(
        "sandbox daemon",
        [sys.executable, "-m", "vmrun.sandbox_daemon", "--id", sandbox_id, "--hostname", hostname,
         "--netns", netns, "--cgroup", cgroup, "--ready-fd", str(ready.write_fd), *debug],
        pass_fds=(ready.write_fd,),
        die_with_parent=False,  # it outlives this CLI call
    ).start()
    try:
        ready.wait(daemon, boot_timeout + 15)
    except BaseException:
        daemon.stop(_STOP_GRACE)
        if cgroup:
            HostCgroup(cgroup).remove()  # in case it died before it could
        _remove_daemon_log(vm_dir)  # a failed start kept it with the sandbox's (kept_logs.py)
        raise
    # Taken while it is our child, not yet reaped: its pid is still its own.
    return ProcessRef.of(daemon.pid)


def adopt_sandbox_daemon(daemon: ProcessRef) -> None:
    """Tell the daemon it is recorded: from now on it outlives whoever started it."""
    if not daemon.signal(signal.SIGUSR1):
        raise VmrunError(f"the sandbox daemon (pid {daemon.pid}) exited before it was adopted")


def stop_sandbox_daemon(daemon: ProcessRef, vm_dir: Path, cgroup: str = "") -> None:
    """Ask the daemon to tear its guest down, and wait for it (killing it if need be)."""
    _stop_process(daemon)
    if cgroup:
        HostCgroup(cgroup).remove()  # the daemon does, but not if it was killed
    if not vm_dir.is_absolute() or not vm_dir.name:
        return  # never a relative or empty path: that would be the caller's directory
    # After a kill its helpers die with it (and with them the clone's RAM), but its mounts
    # and files stay: remove them.
    if vm_dir.exists():
        remove_tree_safely(vm_dir)
    _remove_daemon_log(vm_dir)
    # A killed virtiofsd leaves its pid file (a stopped one's goes with Virtiofsd.stop).
    pid_file_for(vm_dir / VIRTIOFSD_SOCKET).unlink(missing_ok=True)


def _remove_daemon_log(vm_dir: Path) -> None:
    log_file = daemon_log_for(vm_dir)
    for path in (log_file, log_file.with_name(log_file.name + ".1")):
        path.unlink(missing_ok=True)


def _stop_process(daemon: ProcessRef) -> None:
    # A daemon that is gone, or whose pid another process took, gets no signal at all.
    if not daemon.signal(signal.SIGTERM):
        return
    for stuck in wait_until_gone([daemon], _STOP_GRACE):
        if stuck.signal(signal.SIGKILL):  # refused, and logged, for a daemon recorded without its start time
            wait_until_gone([stuck], _STOP_GRACE)  # its cgroup and mounts go next


def _log_to_file(path: Path, level: int | str) -> None:
    """What the daemon has to say (a watcher's warning, a helper's death) goes to its log,
    capped: 1 MiB, rotated once."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_LIMIT, backupCount=1)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("vmrun")
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmrun-sandbox-daemon")
    parser.add_argument("--id", required=True)
    parser.add_argument("--hostname", default="")
    parser.add_argument("--netns", default="", help="the pod's network namespace, carried into the guest")
    parser.add_argument("--cgroup", default="", help="the pod's host cgroup, for this daemon and its helpers")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--debug", action="store_true", help="log debug messages too")
    args = parser.parse_args(argv)
    defer_unused_grpc_modules()  # before the agent client imports gRPC: less memory per pod
    config = load_config()
    _log_to_file(daemon_log_for(vm_dir_for(config, args.id)), logging.DEBUG if args.debug else config.log_level)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    starter = os.getppid()

    def adopted(*_: object) -> None:
        nonlocal starter
        starter = 0

    signal.signal(signal.SIGUSR1, adopted)
    # Left, and removed, last: after the sandbox has closed, however it ends.
    with contextlib.ExitStack() as in_cgroup:
        try:
            with interrupted_by_signals():
                in_cgroup.enter_context(joined(args.cgroup))  # before any helper: they start in it
                sandbox = Sandbox(args.id, config, hostname=args.hostname).start()
                try:
                    if args.netns:
                        sandbox.attach_network(args.netns)
                except BaseException:
                    sandbox.close()
                    raise
        except VmrunError as exc:
            ReadyPipe.report(args.ready_fd, str(exc))
            return 1
        except Exception as exc:  # noqa: BLE001 - the starter must hear why, then we fail loudly
            ReadyPipe.report(args.ready_fd, f"sandbox daemon failed: {exc!r}")
            raise
        try:
            ReadyPipe.report(args.ready_fd)
            while not stop.wait(0.5):
                if sandbox.vm is None or not sandbox.vm.alive():
                    break
                if starter and os.getppid() != starter:
                    break  # not adopted, and its starter is gone: nobody will ever use it
        finally:
            sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
