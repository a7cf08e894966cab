"""The runc-compatible command line, and its one top-level error handler."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import vmrun
from vmrun.config import load_config
from vmrun.errors import ContainerNotFoundError, VmrunError
from vmrun.log import setup_logging
from vmrun.oci import validate_id, write_default_spec
from vmrun.state import DEFAULT_ROOT, StateStore

log = logging.getLogger("vmrun")


def parse_signal(text: str) -> int:
    """A signal as runc takes it: a number, or a name with or without SIG."""
    if text.isdigit():
        number = int(text)
        if number <= 0 or number >= signal.NSIG:
            raise VmrunError(f"invalid signal {text!r}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise VmrunError(f"invalid signal {text!r}") from None


def _store(args: argparse.Namespace) -> StateStore:
    return StateStore(Path(args.root))


def cmd_run(args: argparse.Namespace) -> int:
    from vmrun.runner import run_container

    if args.detach or args.console_socket:
        raise VmrunError("vmrun run: --detach and --console-socket are not supported yet; use create and start")
    if args.pid_file:
        # The container's stand-in on the host is this process (it relays and exits with it).
        Path(args.pid_file).write_text(str(os.getpid()))
    return run_container(load_config(), _store(args), args.bundle, args.id)


def cmd_spec(args: argparse.Namespace) -> int:
    write_default_spec(Path(args.bundle))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    print(json.dumps(_store(args).load(args.id).runc_json(), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    states = [s.runc_json() for s in _store(args).list()]
    if args.format == "json":
        print(json.dumps(states))
        return 0
    if args.quiet:
        for s in states:
            print(s["id"])
        return 0
    print(f"{'ID':<20}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}{'CREATED':<32}OWNER")
    for s in states:
        print(f"{s['id']:<20}{s['pid']:<10}{s['status']:<10}{s['bundle']:<40}{s['created']:<32}{s['owner']}")
    return 0


def _signal_container(args: argparse.Namespace, container_id: str, signum: int, all_processes: bool) -> None:
    from vmrun.agent.client import AgentClient

    state = _store(args).load(container_id)
    if state.live_status() == "stopped":
        raise VmrunError(f"container {container_id!r} is not running")
    with AgentClient(str(Path(state.vm_dir) / "agent.sock"), call_timeout=10.0) as agent:
        agent.signal_process(container_id, signum, all_processes=all_processes)


def cmd_kill(args: argparse.Namespace) -> int:
    _signal_container(args, args.id, parse_signal(args.signal), args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    validate_id(args.id)
    try:
        state = store.load(args.id)
    except ContainerNotFoundError:
        if args.force:
            return 0  # as runc: forcing the delete of what is not there succeeds
        raise
    if state.live_status() != "stopped":
        if not args.force:
            raise VmrunError(f"cannot delete container {args.id!r} that is not stopped: {state.live_status()}")
        _signal_container(args, args.id, signal.SIGKILL, True)
        return 0  # the process holding the sandbox tears it down and removes the state
    store.remove(args.id)
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from guest.build import build_image

    config = load_config()
    image, cache_hit, seconds = build_image(config.image_dir, force=args.force,
                                            log=lambda line: print(line, file=sys.stderr))
    verdict = "up to date (cache hit)" if cache_hit else "built"
    print(f"guest image {image.key} {verdict} in {seconds:.1f}s: {image.size_bytes / 2**20:.1f} MiB "
          f"(kernel {image.kernel}, initrd {image.initrd})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmrun", description="Run OCI containers inside lightweight QEMU guests.")
    parser.add_argument("--version", "-v", action="version", version=f"vmrun version {vmrun.__version__}")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="directory for container state")
    parser.add_argument("--log", default="", help="log file (runc-style lines)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--systemd-cgroup", action="store_true", help="accepted for runc compatibility")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="create and run a container in its own guest")
    run.add_argument("--bundle", "-b", default=".", help="path to the OCI bundle")
    run.add_argument("--pid-file", help="write the pid standing for the container (this process) here")
    run.add_argument("--console-socket", help="not supported by run yet")
    run.add_argument("--detach", "-d", action="store_true", help="not supported yet")
    run.add_argument("--no-pivot", action="store_true")
    run.add_argument("--no-new-keyring", action="store_true")
    run.add_argument("--preserve-fds", type=int, default=0)
    run.add_argument("--keep", action="store_true")
    run.add_argument("id")
    run.set_defaults(handler=cmd_run)

    spec = commands.add_parser("spec", help="write a default config.json")
    spec.add_argument("--bundle", "-b", default=".")
    spec.add_argument("--rootless", action="store_true")
    spec.set_defaults(handler=cmd_spec)

    state = commands.add_parser("state", help="print a container's state as JSON")
    state.add_argument("id")
    state.set_defaults(handler=cmd_state)

    listing = commands.add_parser("list", aliases=["ls"], help="list containers")
    listing.add_argument("--format", "-f", choices=("table", "json"), default="table")
    listing.add_argument("--quiet", "-q", action="store_true")
    listing.set_defaults(handler=cmd_list)

    kill = commands.add_parser("kill", help="send a signal to a container's init process")
    kill.add_argument("--all", "-a", action="store_true")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    kill.set_defaults(handler=cmd_kill)

    delete = commands.add_parser("delete", aliases=["rm"], help="delete a stopped container")
    delete.add_argument("--force", "-f", action="store_true")
    delete.add_argument("id")
    delete.set_defaults(handler=cmd_delete)

    image = commands.add_parser("image", help="the guest image")
    image_commands = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    build = image_commands.add_parser("build", help="build the guest kernel + initrd (cached)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.set_defaults(handler=cmd_image_build)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs_to_file = setup_logging(args.log, args.log_format, args.debug)
    try:
        code = args.handler(args)
    except VmrunError as exc:
        # One line for the caller on stderr, and one in the --log file containerd reads.
        if logs_to_file:
            log.error(str(exc))
        print(f"vmrun: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
