"""crun, driven by the in-guest agent: it creates the containers inside the guest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vmrun.agent import debug_log
from vmrun.agent.processes import Child, Spawner, exit_status
from vmrun.common import linux
from vmrun.common.files import write_json_atomic

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"
CRUN_STORE = "/run/vmrun/crun-binary"  # see pin_crun_binary


def pin_crun_binary() -> None:
    """Give crun a read-only binary, once per guest.

    Against CVE-2019-5736, crun re-executes itself from a sealed copy on every call
    unless its binary is on a read-only filesystem. From the initramfs (a tmpfs, which it
    reads as an unsealed memfd) it even execs twice more, first from a read-only bind
    mount and then from a memfd copy; under TCG every exec and dynamic link costs tens
    of milliseconds. A copy on a read-only ramfs protects the binary as well.
    """
    if os.statvfs(CRUN).f_flag & os.ST_RDONLY:
        return  # on the read-only root image (guest/root_image.py): crun runs it as it is
    linux.pin_read_only_copy(CRUN, CRUN_STORE)


class CrunError(Exception):
    """crun failed; the message is crun's own error line."""


@dataclass(frozen=True)
class Stdio:
    """The three fds a container process gets (crun passes them through)."""

    stdin: int
    stdout: int
    stderr: int


class Crun:
    def __init__(self, spawner: Spawner):
        self._spawner = spawner

    def _base(self, log_file: Path | None = None) -> list[str]:
        args = [CRUN, "--root", CRUN_ROOT]
        if log_file is not None:
            args += ["--log", f"file:{log_file}", "--log-format", "json"]
        return args

    def _simple(self, *args: str) -> bytes:
        result = self._spawner.run([*self._base(), *args])
        debug_log.debug(f"crun {' '.join(args)}: exit {result.returncode}")
        if result.returncode != 0:
            raise CrunError(_last_line(result.stderr) or f"crun {args[0]} failed ({result.returncode})")
        return result.stdout

    def _with_stdio(self, args: list[str], log_file: Path, stdio: Stdio) -> None:
        """Run a crun command whose children inherit `stdio`; errors come from its log."""
        log_file.unlink(missing_ok=True)
        child = self._spawner.spawn(
            [*self._base(log_file), *args], stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr
        )
        status = self._spawner.reaper.wait(child)
        assert status is not None
        code, _ = exit_status(status)
        debug_log.debug(f"crun {' '.join(args)}: exit {code}")
        if code != 0:
            raise CrunError(_last_log_message(log_file) or f"crun {args[0]} failed ({code})")

    def _watch_pid_file(self, pid_file: Path) -> Child:
        # Registered as soon as it is known: the process may already have exited.
        return self._spawner.reaper.watch(int(pid_file.read_text().strip()))

    def create(self, container_id: str, bundle: Path, stdio: Stdio, console_socket: Path | None,
               start: bool = False) -> Child:
        """crun create; with `start`, crun run --detach: one crun process fewer, which under
        TCG is a tenth of a second."""
        pid_file = bundle / "init.pid"
        command = ["run", "--detach"] if start else ["create"]
        args = [*command, "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        self._with_stdio([*args, container_id], bundle / "crun.log", stdio)
        return self._watch_pid_file(pid_file)

    def exec(self, container_id: str, process_file: Path, stdio: Stdio, console_socket: Path | None) -> Child:
        pid_file = process_file.with_suffix(".pid")
        args = ["exec", "--process", str(process_file), "--detach", "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        self._with_stdio([*args, container_id], process_file.with_suffix(".log"), stdio)
        return self._watch_pid_file(pid_file)

    def start(self, container_id: str) -> None:
        self._simple("start", container_id)

    def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        self._simple("kill", *(["--all"] if all_processes else []), container_id, str(signal))

    def delete(self, container_id: str, force: bool = False) -> None:
        self._simple("delete", *(["--force"] if force else []), container_id)

    def pause(self, container_id: str) -> None:
        self._simple("pause", container_id)

    def resume(self, container_id: str) -> None:
        self._simple("resume", container_id)

    def pids(self, container_id: str) -> list[int]:
        # crun's ps prints a table unless asked for JSON.
        return [int(p) for p in json.loads(self._simple("ps", "--format", "json", container_id) or b"[]")]

    def update(self, container_id: str, resources_file: Path) -> None:
        self._simple("update", "--resources", str(resources_file), container_id)


def _last_line(text: str | bytes) -> str:
    """The last non-blank line, stripped: where a tool puts its error."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_log_message(log_file: Path) -> str:
    """The message of the last entry of crun's JSON log (or that line, if not JSON)."""
    try:
        line = _last_line(log_file.read_text(errors="replace"))
    except OSError:
        return ""
    try:
        return str(json.loads(line).get("msg", "")).strip()
    except (ValueError, AttributeError):
        return line


def write_json(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, document)
