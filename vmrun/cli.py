"""The runc-compatible command line, and its one top-level error handler."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import vmrun
from vmrun.config import Config, config_as_dict, config_path, load_config
from vmrun.errors import CommandError, ConfigError, StateConflictError, UsageError, VmrunError
from vmrun.hooks import SUPPORTED_HOOKS
from vmrun.log import setup_logging
from vmrun.oci import load_bundle, process_problem, write_default_spec
from vmrun.orphans import reclaim_orphaned
from vmrun.proc import run
from vmrun.state import DEFAULT_ROOT, StateStore

if TYPE_CHECKING:
    from vmrun.containers import Containers

log = logging.getLogger("vmrun")


def parse_signal(text: str) -> int:
    """A signal as runc takes it: a number, or a name with or without SIG."""
    if text.isascii() and text.isdigit():  # not "²": a digit to str.isdigit, not to int()
        number = int(text)
        if number >= signal.NSIG:  # 0 is kill(2)'s own: whether the container is alive
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
        raise VmrunError("run: --detach and --console-socket are not supported yet: use create and start")
    return run_container(args.config, _store(args), args.bundle, args.id, pid_file=args.pid_file or "")


def cmd_spec(args: argparse.Namespace) -> int:
    write_default_spec(Path(args.bundle))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    store = _store(args)
    state = store.load(args.id)
    reclaim_orphaned(args.config, store, [state])
    print(json.dumps(state.runc_json(), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    found = store.list()
    reclaim_orphaned(args.config, store, found)
    if args.quiet:  # before --format, as runc
        for state in found:
            print(state.id)
        return 0
    states = [{**s.runc_json(), "owner": _owner(store.root / s.id)} for s in found]
    if args.format == "json":
        print(json.dumps(states))
        return 0
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"),
            *((s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states)]
    # As runc's tabwriter: columns as wide as their longest cell (12 at least), 3 spaces apart.
    widths = [max(12, *(len(row[column]) for row in rows)) + 3 for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("".join(cell.ljust(width) for cell, width in zip(row, widths)) + row[-1])
    return 0


def _owner(state_dir: Path) -> str:
    """Who owns a container's state directory, as runc's list names them: a user, or #uid."""
    import pwd

    try:
        uid = state_dir.stat().st_uid
    except OSError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _containers(args: argparse.Namespace) -> "Containers":
    from vmrun.containers import Containers

    return Containers(args.config, _store(args))


def cmd_create(args: argparse.Namespace) -> int:
    _containers(args).create(args.id, args.bundle, args.pid_file or "", args.console_socket or "")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    _containers(args).start(args.id)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    _store(args).load(args.id)  # as runc: a container that does not exist is the error, whatever the signal
    _containers(args).kill(args.id, parse_signal(args.signal), args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _containers(args).delete(args.id, args.force)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from vmrun.containers import exec_process_from_args

    containers = _containers(args)
    if args.process:
        try:
            process = json.loads(Path(args.process).read_bytes())
        except (OSError, ValueError) as exc:
            raise VmrunError(f"exec: cannot read process file {args.process}: {exc}") from None
        if problem := process_problem(process):
            raise VmrunError(f"exec: process file {args.process}: {problem}")
    else:
        spec = load_bundle(_store(args).load(args.id).bundle).spec
        process = exec_process_from_args(spec, args.command, cwd=args.cwd, env=args.env, user=args.user,
                                         tty=args.tty)
    return containers.exec(args.id, process, detach=args.detach, pid_file=args.pid_file or "",
                           console_socket=args.console_socket or "")


def cmd_ps(args: argparse.Namespace) -> int:
    if args.ps_options and args.format != "json":  # runc's JSON ignores them too
        raise VmrunError(f"ps: ps options ({' '.join(args.ps_options)}) are not supported: the processes are "
                         "the guest's; vmrun prints ps -ef's columns")
    containers = _containers(args)
    if args.format == "json":
        # The pids a caller can match and signal: those standing for the container's init
        # and execs on the host (containerd's shim finds an exec's id by its pid here).
        print(json.dumps(containers.host_pids(args.id)))
    else:
        from vmrun.process_table import process_table

        sys.stdout.write(process_table(containers.processes(args.id)))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _containers(args).pause(args.id)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _containers(args).resume(args.id)
    return 0


def _size(text: str) -> int:
    from vmrun.resources import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_update(args: argparse.Namespace) -> int:
    if args.resources:
        from vmrun.resources import check_resources

        # Bytes: json.loads decodes them, and text that is not UTF-8 is one more ValueError.
        source = sys.stdin.buffer.read() if args.resources == "-" else Path(args.resources).read_bytes()
        try:
            resources = json.loads(source)
        except ValueError as exc:
            raise VmrunError(f"update: resources are not valid JSON: {exc}") from None
        check_resources(resources, "update: resources")
    else:
        resources = resources_from_flags(args)
    _containers(args).update(args.id, resources)
    return 0


def resources_from_flags(args: argparse.Namespace) -> dict:
    resources: dict = {}
    if args.memory is not None:
        resources.setdefault("memory", {})["limit"] = args.memory
    if args.memory_swap is not None:
        resources.setdefault("memory", {})["swap"] = args.memory_swap
    for flag, key in (("cpu_shares", "shares"), ("cpu_quota", "quota"), ("cpu_period", "period")):
        if getattr(args, flag) is not None:
            resources.setdefault("cpu", {})[key] = getattr(args, flag)
    if args.cpuset_cpus:
        resources.setdefault("cpu", {})["cpus"] = args.cpuset_cpus
    if args.pids_limit is not None:
        resources["pids"] = {"limit": args.pids_limit}
    return resources


def cmd_events(args: argparse.Namespace) -> int:
    """As runc: one stats event with --stats, else one every --interval until it stops,
    and an "oom" event whenever the guest's OOM killer kills in the container."""
    containers = _containers(args)
    printing = threading.Lock()

    def emit(event: dict) -> None:
        with printing:
            print(json.dumps(event), flush=True)

    if not args.stats:
        def tell_ooms() -> None:
            with contextlib.suppress(VmrunError):
                for _ in containers.watch_oom(args.id):
                    emit({"type": "oom", "id": args.id})

        threading.Thread(target=tell_ooms, name="oom-events", daemon=True).start()
    first = True
    while True:
        try:
            data = containers.stats(args.id)
        except StateConflictError:
            if args.stats or first:
                raise  # as runc: not running, so no events to give
            return 0  # the container stopped: the event stream ends
        first = False
        emit({"type": "stats", "id": args.id, "data": data})
        if args.stats:
            return 0
        time.sleep(args.interval)


def _pool_size(text: str) -> int:
    """A pool's size as vmrun.toml's pool_size takes it: 1 to 256 guests."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 256):
        raise argparse.ArgumentTypeError(f"must be a number of guests from 1 to 256 (got {text!r})")
    return int(text)


def _seconds(text: str) -> float:
    """runc's Go durations for --interval: 5s, 500ms, 1m, 1h, or plain seconds; above 0."""
    number, factor = text, 1.0
    for suffix, suffix_factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], suffix_factor
            break
    if not (number.isascii() and number.replace(".", "", 1).isdigit()):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    seconds = float(number) * factor
    if seconds <= 0:
        raise argparse.ArgumentTypeError("duration interval must be greater than 0")
    return seconds


def cmd_features(args: argparse.Namespace) -> int:
    from vmrun.oci import MAX_OCI_VERSION

    print(json.dumps({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": MAX_OCI_VERSION,
        "hooks": list(SUPPORTED_HOOKS),
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "cgroup": {"v1": False, "v2": True},
            "seccomp": {"enabled": True},
        },
        "annotations": {"io.vmrun.isolation": "vm"},
    }, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from vmrun.diagnostics import check

    findings = check(args.config)
    for finding in findings:
        print(f"{'ok' if finding.ok else 'MISSING':<8}{finding.item:<14}{finding.detail}")
    return 0 if all(f.ok for f in findings) else 1


def _component(version: str | None, detail: str) -> dict[str, object]:
    # TOML has no null: a component not found (version None) has found = false, version
    # "", and its detail says why.
    return {"found": version is not None, "version": version or "", "detail": detail}


def _tool_version(argv: list[str]) -> dict[str, object]:
    """A helper's `--version`: its first line, and the version number in it."""
    try:
        first = run([*argv, "--version"], timeout=10).stdout.decode(errors="replace").strip().splitlines()
    except CommandError as exc:
        return _component(None, str(exc))
    line = first[0] if first else ""
    match = re.search(r"version\s+(\S+)", line) or re.search(r"(\d+\.\d+\S*)", line)
    return _component(match.group(1) if match else line, f"{argv[0]}: {line}")


def env_report(config: Config) -> dict[str, object]:
    """What `vmrun env` prints: the config file in force, the effective configuration (as a
    vmrun.toml would say it) and the versions of vmrun, QEMU, virtiofsd and the guest."""
    from vmrun.bootfiles import guest_versions
    from vmrun.hypervisor.virtiofsd import find_virtiofsd

    try:
        virtiofsd = _tool_version([find_virtiofsd(config.virtiofsd)])
    except VmrunError as exc:
        virtiofsd = _component(None, str(exc))
    guest = guest_versions(config)
    path = config_path()
    return {
        "config_file": str(path) if path else "",  # "": no file, the defaults
        "config": config_as_dict(config),
        "versions": {
            "vmrun": _component(vmrun.__version__, str(Path(vmrun.__file__).parent)),
            "qemu": _tool_version([config.qemu]),
            "virtiofsd": virtiofsd,
            "guest_kernel": _component(guest.kernel, guest.kernel_detail),
            "guest_image": _component(guest.image, guest.image_detail),
        },
    }


def cmd_env(args: argparse.Namespace) -> int:
    report = env_report(args.config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        import tomli_w

        sys.stdout.write(tomli_w.dumps(report))
    return 0


def cmd_network_add(args: argparse.Namespace) -> int:
    for name in _containers(args).network_add(args.id, args.netns or ""):
        print(name)
    return 0


def cmd_network_rm(args: argparse.Namespace) -> int:
    _containers(args).network_rm(args.id, args.interface)
    return 0


def cmd_network_ls(args: argparse.Namespace) -> int:
    interfaces = _containers(args).network_ls(args.id)
    if args.format == "json":
        print(json.dumps(interfaces))
    for entry in interfaces if args.format == "table" else []:
        print(f"{entry['name']:<16}{entry['mac']:<20}{entry['tap']:<16}{' '.join(entry['addresses'])}")
    return 0


def cmd_template_create(args: argparse.Namespace) -> int:
    from vmrun.templating import create_template

    template, seconds = create_template(args.config, args.name)
    print(f"template {args.name} created in {seconds:.1f}s at {template.path}")
    return 0


def cmd_template_list(args: argparse.Namespace) -> int:
    from vmrun.templating import describe_templates

    for line in describe_templates(args.config):
        print(line)
    return 0


def cmd_template_rm(args: argparse.Namespace) -> int:
    from vmrun.hypervisor.templates import TemplateStore

    if not TemplateStore(args.config.templates_dir).remove(args.name):
        raise VmrunError(f"template {args.name!r} does not exist")
    return 0


def cmd_pool_serve(args: argparse.Namespace) -> int:
    from vmrun.pool import Pool

    if not args.config.pool_socket:
        raise VmrunError("pool: set pool_socket in vmrun.toml (create looks for the pool there)")
    size = args.config.pool_size if args.size is None else args.size
    Pool(args.config, size).serve(Path(args.config.pool_socket))
    return 0


def cmd_pool_status(args: argparse.Namespace) -> int:
    from vmrun.control import ControlError
    from vmrun.pool import pool_status

    if not args.config.pool_socket:
        raise VmrunError("pool: no pool_socket in vmrun.toml")
    try:
        print(json.dumps(pool_status(Path(args.config.pool_socket))))
    except ControlError as exc:
        raise VmrunError(f"pool: {exc}") from None
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from vmrun.monitor import serve  # prometheus_client: for this command only

    return serve(args.config, args.listen)


def cmd_image_build(args: argparse.Namespace) -> int:
    from guest.build import build_image

    image, cache_hit, seconds = build_image(args.config.image_dir, force=args.force,
                                            log=lambda line: print(line, file=sys.stderr),
                                            kernel_source=args.config.guest_kernel)
    verdict = "up to date (cache hit)" if cache_hit else "built"
    print(f"guest image {image.key} {verdict} in {seconds:.1f}s: {image.size_bytes / 2**20:.1f} MiB "
          f"(kernel {image.kernel}, initrd {image.initrd})")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # One line, like every other error of ours (argparse prints the whole usage), and
        # through main's handler: into the --log file too, where containerd looks.
        raise UsageError(f"{message} (see {self.prog} --help)")


# The global options that say where errors go, which main needs before argparse, whose
# errors must go there too: --log FILE, --log-format FORMAT, --debug.
_GLOBAL_OPTIONS_WITH_VALUES = {"--root", "--log", "--log-format"}


def _log_options(argv: list[str]) -> tuple[str, str, bool]:
    """--log, --log-format and --debug as given before the command (argparse's rules
    checked later: an invalid format falls back to text here)."""
    found = {"--log": "", "--log-format": "text"}
    debug = False
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "--":
            break  # the command: global options come before it
        name, has_value, value = word.partition("=")
        if name in _GLOBAL_OPTIONS_WITH_VALUES:
            value = value if has_value else next(words, "")
            if name in found:
                found[name] = value
        elif word == "--debug":
            debug = True
    log_format = found["--log-format"] if found["--log-format"] in ("text", "json") else "text"
    return found["--log"], log_format, debug


class _PrintVersion(argparse.Action):
    """As runc and crun print theirs: "<name> version X", then "key: value" lines (Docker's
    `info` takes the first line's name and version)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from vmrun.oci import MAX_OCI_VERSION

        python = ".".join(str(part) for part in sys.version_info[:3])
        print(f"vmrun version {vmrun.__version__}\nspec: {MAX_OCI_VERSION}\npython: {python}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options (as runc): _log_options sees them as argparse does.
    parser = _Parser(prog="vmrun", description="Run OCI containers inside lightweight QEMU guests.",
                     allow_abbrev=False)
    parser.add_argument("--version", "-v", action=_PrintVersion, nargs=0, help="print the version and exit")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="directory for container state")
    parser.add_argument("--log", default="", help="log file (runc-style lines)")
    # runc's default: text (logfmt). containerd's shim passes --log-format json itself.
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="format of --log lines (default text, as runc)")
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

    create = commands.add_parser("create", help="create a container (its guest, its process, not started)")
    create.add_argument("--bundle", "-b", default=".")
    create.add_argument("--pid-file")
    create.add_argument("--console-socket")
    create.add_argument("--no-pivot", action="store_true")
    create.add_argument("--no-new-keyring", action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    create.add_argument("id")
    create.set_defaults(handler=cmd_create)

    start = commands.add_parser("start", help="start a created container")
    start.add_argument("id")
    start.set_defaults(handler=cmd_start)

    exec_ = commands.add_parser("exec", help="run a process in a running container")
    exec_.add_argument("--process", "-p")
    exec_.add_argument("--detach", "-d", action="store_true")
    exec_.add_argument("--pid-file")
    exec_.add_argument("--tty", "-t", action="store_true")
    exec_.add_argument("--console-socket")
    exec_.add_argument("--cwd", default="")
    exec_.add_argument("--env", "-e", action="append", default=[])
    exec_.add_argument("--user", "-u", default="")
    exec_.add_argument("--preserve-fds", type=int, default=0)
    exec_.add_argument("id")
    exec_.add_argument("command", nargs=argparse.REMAINDER)
    exec_.set_defaults(handler=cmd_exec)

    ps = commands.add_parser("ps", help="a container's processes, as its guest sees them")
    ps.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ps.add_argument("id")
    ps.add_argument("ps_options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ps.set_defaults(handler=cmd_ps)

    for name, handler, text in (("pause", cmd_pause, "freeze a container's processes"),
                                ("resume", cmd_resume, "thaw a paused container")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("id")
        sub.set_defaults(handler=handler)

    update = commands.add_parser("update", help="change a container's resource limits")
    update.add_argument("--resources", "-r", help="OCI LinuxResources JSON file, or - for stdin")
    update.add_argument("--memory", type=_size, help="memory limit, in bytes or with a unit (512m, 1g)")
    update.add_argument("--memory-swap", type=_size, help="memory + swap limit (-1: unlimited)")
    update.add_argument("--cpu-shares", type=int)
    update.add_argument("--cpu-quota", type=int)
    update.add_argument("--cpu-period", type=int)
    update.add_argument("--cpuset-cpus", default="")
    update.add_argument("--pids-limit", type=int)
    update.add_argument("id")
    update.set_defaults(handler=cmd_update)

    events = commands.add_parser("events", help="resource usage statistics of a container, as JSON")
    events.add_argument("--stats", action="store_true", help="print one statistics event and exit")
    events.add_argument("--interval", type=_seconds, default=5.0, help="between statistics events (default 5s)")
    events.add_argument("id")
    events.set_defaults(handler=cmd_events)

    features = commands.add_parser("features", help="what this runtime supports, as JSON")
    features.set_defaults(handler=cmd_features)

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

    check = commands.add_parser("check", help="what this host offers and what vmrun will use")
    check.set_defaults(handler=cmd_check)
    env = commands.add_parser("env", help="the effective configuration and versions, as TOML")
    env.add_argument("--json", action="store_true", help="the same as JSON")
    env.set_defaults(handler=cmd_env)

    network = commands.add_parser("network", help="the pod interfaces of a running container's guest")
    network_commands = network.add_subparsers(dest="network_command", metavar="NETWORK_COMMAND", required=True)
    network_add = network_commands.add_parser(
        "add", help="plug the pod interfaces the guest lacks (after another CNI ADD, say)")
    network_add.add_argument("--netns", help="the pod's network namespace (default: the one its spec joins)")
    network_add.add_argument("id")
    network_add.set_defaults(handler=cmd_network_add)
    network_rm = network_commands.add_parser("rm", help="unplug a pod interface from the guest")
    network_rm.add_argument("id")
    network_rm.add_argument("interface")
    network_rm.set_defaults(handler=cmd_network_rm)
    network_ls = network_commands.add_parser("ls", help="the pod interfaces plugged into the guest")
    network_ls.add_argument("--format", "-f", choices=("table", "json"), default="table")
    network_ls.add_argument("id")
    network_ls.set_defaults(handler=cmd_network_ls)
    template = commands.add_parser("template", help="VM templates sandboxes restore from instead of booting")
    template_commands = template.add_subparsers(dest="template_command", metavar="TEMPLATE_COMMAND", required=True)
    template_create = template_commands.add_parser("create", help="boot a template's guest and save it")
    template_create.add_argument("name", nargs="?", default="default")
    template_create.set_defaults(handler=cmd_template_create)
    template_list = template_commands.add_parser("list", help="saved templates, and whether clones may use them")
    template_list.set_defaults(handler=cmd_template_list)
    template_rm = template_commands.add_parser("rm", help="remove a saved template")
    template_rm.add_argument("name")
    template_rm.set_defaults(handler=cmd_template_rm)

    pool = commands.add_parser("pool", help="a pool of ready guests that create takes from")
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="POOL_COMMAND", required=True)
    pool_serve = pool_commands.add_parser("serve", help="keep guests ready until SIGTERM (in the foreground)")
    pool_serve.add_argument("--size", type=_pool_size, help="guests to keep ready, 1 to 256 (default: pool_size)")
    pool_serve.set_defaults(handler=cmd_pool_serve)
    pool_status = pool_commands.add_parser("status", help="how many guests are ready")
    pool_status.set_defaults(handler=cmd_pool_status)

    monitor = commands.add_parser("monitor", help="serve the pods' metrics for Prometheus until SIGTERM "
                                  "(in the foreground)")
    monitor.add_argument("--listen", default="127.0.0.1:8090",
                         help="HOST:PORT to serve /metrics on (default 127.0.0.1:8090; :8090 for all addresses)")
    monitor.set_defaults(handler=cmd_monitor)

    image = commands.add_parser("image", help="the guest image")
    image_commands = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    build = image_commands.add_parser("build", help="build the guest kernel + initrd (cached)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.set_defaults(handler=cmd_image_build)
    return parser


def _os_error_line(exc: OSError) -> str:
    """An OSError nobody anticipated, as one line: what failed, on which file."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if getattr(args, "preserve_fds", 0):
        raise VmrunError("--preserve-fds is not supported yet")
    if getattr(args, "rootless", False):
        raise VmrunError("spec --rootless is not supported: vmrun runs as root")


# These only read and change what --root holds (the state records each container's
# sandbox): a caller must be able to see, stop and clean up its containers whatever
# vmrun.toml says, so a config that does not load is set aside for them.
_CONFIG_OPTIONAL = frozenset({cmd_state, cmd_list, cmd_kill, cmd_delete})


def _load_config(args: argparse.Namespace, logs_to_file: bool) -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        if args.handler not in _CONFIG_OPTIONAL:  # (args.command: exec's argv overwrites it)
            raise
        # Only to the --log file: callers parse what state and list print (go-runc reads
        # state's stderr with its stdout), so nothing goes to stderr on success.
        if logs_to_file:
            log.warning("%s (%s goes on without it)", exc, args.handler.__name__.removeprefix("cmd_"))
        return Config()


def _open_closed_std_streams() -> None:
    """A caller may start us with stdin, stdout or stderr closed (`<&-`, `>&-`): each is
    /dev/null then (read as EOF, written to nowhere), so no file we open later takes its
    number and is taken for it, and the container's process gets one too."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def main(argv: list[str] | None = None) -> None:
    _open_closed_std_streams()
    argv = sys.argv[1:] if argv is None else argv
    logs_to_file = False
    try:
        logs_to_file = setup_logging(*_log_options(argv))
        args = build_parser().parse_args(argv)
        _refuse_unsupported(args)
        args.config = _load_config(args, logs_to_file)
        if not args.debug:
            logging.getLogger("vmrun").setLevel(args.config.log_level.upper())
        code = args.handler(args)
    except (VmrunError, OSError) as exc:
        _report(str(exc) if isinstance(exc, VmrunError) else _os_error_line(exc), logs_to_file)
        code = exc.exit_code if isinstance(exc, VmrunError) else 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, where the caller looks
        import traceback

        log.debug("internal error: %s", traceback.format_exc())  # with --debug: where it came from
        _report(f"internal error: {type(exc).__name__}: {exc}", logs_to_file)
        code = 1
    _exit_now(code)


def _report(message: str, logs_to_file: bool) -> None:
    """One line for the caller on stderr, and one in the --log file containerd reads."""
    if logs_to_file:
        log.error(message)
    # A path in a message may hold a newline: stderr still gets one line.
    print("vmrun: " + message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown: every process, mount and socket a command
    made is gone by now (context managers), and tearing down the modules (gRPC's among
    them) would cost ~20 ms on every call; containerd makes several per container."""
    logging.shutdown()  # flushes the --log file
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 120  # as Python itself exits when its output cannot be flushed
    os._exit(code)


if __name__ == "__main__":
    main()
