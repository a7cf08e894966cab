"""containerd-shim-vmrun-v2: the shim v2 binary containerd runs for
`runtime_type = "io.containerd.vmrun.v2"`.

containerd calls it three ways, in the bundle's directory, with `-namespace`, `-address`
(its gRPC socket), `-publish-binary` and `-id` (and TTRPC_ADDRESS in the environment):
- `start`: print the ttrpc address of the shim that will hold the task. A task of a pod
  whose shim runs (CRI's `sandbox-id` annotations) gets that shim's address: one shim per
  pod. Otherwise a new shim is started, in a session of its own, on a listening socket
  made here (so the address works as soon as it is printed).
- `delete` (with `-bundle`): the shim died; undo what it left for the task (its rootfs
  mounts, and if it held the pod, the guest's directory) and print a DeleteResponse.
- no action: serve (what `start` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vmrun.capped_log import LOG_LIMIT
from vmrun.config import Config, load_config
from vmrun.errors import VmrunError
from vmrun.log import TextFormatter
from vmrun.pod import placement

log = logging.getLogger("vmrun.shimv2")

_SOCKET_FD_ENV = "VMRUN_SHIM_SOCKET_FD"
_KILLED = 128 + 9


def _parse(argv: list[str]) -> argparse.Namespace:
    # Go's flag package: single-dash long flags, "-flag value" or "-flag=value".
    parser = argparse.ArgumentParser(prog="containerd-shim-vmrun-v2")
    parser.add_argument("-namespace", default="")
    parser.add_argument("-address", default="")
    parser.add_argument("-publish-binary", dest="publish_binary", default="")
    parser.add_argument("-id", default="")
    parser.add_argument("-bundle", default="")
    parser.add_argument("-debug", action="store_true")
    parser.add_argument("-socket", default="", help=argparse.SUPPRESS)
    parser.add_argument("-v", "-version", dest="version", action="store_true")
    parser.add_argument("action", nargs="?", default="", choices=["", "start", "delete"])
    return parser.parse_args(argv)


def socket_path(config: Config, containerd_address: str, namespace: str, sandbox_id: str) -> Path:
    """Where the shim of pod `sandbox_id` listens: one per containerd, namespace and pod."""
    digest = hashlib.sha256(f"{containerd_address}\0{namespace}\0{sandbox_id}".encode()).hexdigest()[:32]
    return config.run_dir / "shimv2" / f"{digest}.sock"


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _bundle_spec(bundle: Path) -> dict:
    try:
        return json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise VmrunError(f"bundle {bundle}: cannot read config.json: {exc}") from None


def start(args: argparse.Namespace, config: Config) -> int:
    sys.stdin.buffer.read()  # the runtime options containerd may pass (an Any): none used
    bundle = Path.cwd()
    place = placement(args.id, _bundle_spec(bundle).get("annotations") or {})
    path = socket_path(config, args.address, args.namespace, place.sandbox_id)
    if not _answers(path):
        if not place.owns_guest:
            raise VmrunError(f"the shim of pod {place.sandbox_id!r} is not running")
        _spawn_server(args, path)
    address = f"unix://{path}"
    (bundle / "address").write_text(address)  # containerd reads it back after a restart
    sys.stdout.write(address)
    return 0


def _spawn_server(args: argparse.Namespace, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # a dead shim's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(32)
        argv = [sys.executable, "-m", "vmrun.shimv2.main", "-namespace", args.namespace, "-address", args.address,
                "-publish-binary", args.publish_binary, "-id", args.id, "-socket", str(path),
                *(["-debug"] if args.debug else [])]
        # Its own session, no tie to containerd's output: `start` must end for containerd
        # to read the address, and the shim outlives a containerd restart.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd="/", start_new_session=True, pass_fds=(listener.fileno(),),
                         env={**os.environ, _SOCKET_FD_ENV: str(listener.fileno())})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        listener.close()


def delete(args: argparse.Namespace, config: Config) -> int:
    """The shim is gone: its task's leftovers go; containerd reads a DeleteResponse."""
    from vmrun.shimv2.events import timestamp
    from vmrun.shimv2.proto import shim_pb2
    from vmrun.shimv2.rootfs import unmount_rootfs

    bundle = Path(args.bundle or Path.cwd())
    with contextlib.suppress(OSError):
        unmount_rootfs(bundle)
    try:
        place = placement(args.id, _bundle_spec(bundle).get("annotations") or {})
    except VmrunError:
        place = None
    if place is not None and place.owns_guest:
        path = socket_path(config, args.address, args.namespace, place.sandbox_id)
        if not _answers(path):
            path.unlink(missing_ok=True)
            _reclaim_guest_dir(config, place.sandbox_id, _log_paths(config, path.stem))
    response = shim_pb2.DeleteResponse(pid=0, exit_status=_KILLED, exited_at=timestamp())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


def _reclaim_guest_dir(config: Config, sandbox_id: str, shim_logs: list[Path]) -> None:
    """What a dead shim's guest left (its helpers died with it): the guest's directory and
    mounts; its logs, and the shim's, are kept with the failed sandboxes'."""
    from vmrun.hypervisor.virtiofsd import VIRTIOFSD_SOCKET, pid_file_for
    from vmrun.kept_logs import keep_logs
    from vmrun.mounts import remove_tree_safely
    from vmrun.sandbox import vm_dir_for

    vm_dir = vm_dir_for(config, sandbox_id)
    if vm_dir.exists() or any(path.exists() for path in shim_logs):
        keep_logs(vm_dir, config.run_dir / "failed", sandbox_id, extra=shim_logs)
    if vm_dir.exists():
        remove_tree_safely(vm_dir)
    pid_file_for(vm_dir / VIRTIOFSD_SOCKET).unlink(missing_ok=True)
    for path in shim_logs:
        path.unlink(missing_ok=True)


def serve(args: argparse.Namespace, config: Config) -> int:
    from vmrun.shimv2.events import EventPublisher
    from vmrun.shimv2.task_service import TaskService
    from vmrun.shimv2.ttrpc import TtrpcServer

    listener = socket.socket(fileno=int(os.environ.pop(_SOCKET_FD_ENV)))
    os.environ["VMRUN_SHIM_NAMESPACE"] = args.namespace  # for logging binaries (task_io.py)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    publisher = EventPublisher(args.namespace, os.environ.get("TTRPC_ADDRESS", ""), args.address,
                               args.publish_binary)
    service = TaskService(config, args.namespace, publisher, on_shutdown=stop.set)
    server = TtrpcServer(listener, service.handlers()).start()
    log.info("serving %s", args.socket)
    try:
        stop.wait()
        time.sleep(0.1)  # the Shutdown call's answer goes out first
    finally:
        service.close()
        publisher.close()
        server.close()
        Path(args.socket).unlink(missing_ok=True)
    # A pod that ended well leaves no log (a failed guest's are kept under failed/).
    for path in _log_paths(config, Path(args.socket).stem):
        path.unlink(missing_ok=True)
    return 0


def _log_paths(config: Config, name: str) -> list[Path]:
    log_file = config.run_dir / "daemon-logs" / f"shimv2-{name}.log"
    return [log_file, log_file.with_name(log_file.name + ".1")]


def _log_to_file(config: Config, name: str, debug: bool) -> None:
    path = _log_paths(config, name)[0]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_LIMIT, backupCount=1)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("vmrun")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else config.log_level.upper())


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.version:
        import vmrun

        print(f"containerd-shim-vmrun-v2 {vmrun.__version__}")
        return 0
    try:
        config = load_config()
        if not args.action:
            _log_to_file(config, Path(args.socket).stem, args.debug)
            return serve(args, config)
        logging.getLogger("vmrun").setLevel(logging.DEBUG if args.debug else logging.WARNING)
        return (start if args.action == "start" else delete)(args, config)
    except VmrunError as exc:
        print(f"containerd-shim-vmrun-v2: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
