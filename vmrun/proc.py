"""The one subprocess helper of vmrun.

`run` executes a short command and raises CommandError (one line, with the tail of stderr)
when it fails. `HelperProcess` owns a long-running helper (QEMU, virtiofsd, the vsock
backend): it is a context manager whose exit stops the process, so cleanup is structural.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from vmrun.capped_log import CappedLog
from vmrun.errors import CommandError

_PR_SET_PDEATHSIG = 1


def _sleep_until_exit(pid: int, timeout: float) -> None:
    """Sleep until our child `pid` exits, or for `timeout`: woken by its exit (a pidfd),
    not by polling, since every teardown waits on a few helpers."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # gone (reaped) already
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if vmrun dies, the kernel kills the helper.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def _dying_with_parent(args: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """argv and preexec function that make a helper die with this process.

    util-linux's setpriv sets the parent-death signal (kept across its exec of the
    helper), so no Python runs between fork and exec, and subprocess can vfork: forking
    this process (large, often threaded) costs ~4 ms per helper, three per sandbox."""
    setpriv = _setpriv()
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *args], None
    return args, _die_with_parent


def stdlib_module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `python -m module` for a vmrun module needing only the
    standard library, without `site`: its .pth hooks (an editable install's finder, a
    distribution's own) cost 30 ms and more of CPU at every start, on a hot path."""
    package_root = str(Path(__file__).resolve().parent.parent)  # holds the vmrun package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-S", "-m", module, *args], env


def _last_line(text: str | bytes | None) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    executable: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a short command, capturing its output; raise CommandError when it fails.
    With `executable`, that program runs and `argv` is only its argument vector."""
    args = [os.fspath(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            executable=executable,
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"{executable or args[0]}: command not found") from exc
    except PermissionError as exc:
        raise CommandError(f"{executable or args[0]}: not executable") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{executable or args[0]} did not finish within {timeout:g}s") from exc
    if check and result.returncode != 0:
        detail = _last_line(result.stderr) or _last_line(result.stdout)
        raise CommandError(
            f"{' '.join(args[:3])} failed with exit status {result.returncode}"
            + (f": {detail}" if detail else "")
        )
    return result


@dataclass
class HelperProcess:
    """A long-running helper process, stopped when the object is closed.

    Its stdout and stderr go to `log_path` (or are discarded), so a failure can be
    explained from the log afterwards. With `log_limit`, through a pipe of ours that keeps
    the file at a bounded size (capped_log.py): for a helper a guest can make talk.
    """

    name: str
    argv: Sequence[str | os.PathLike[str]]
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    pass_fds: Sequence[int] = ()
    die_with_parent: bool = True
    # A shim relays the caller's own stdin/stdout/stderr: it inherits them.
    inherit_stdio: bool = False
    stop_signal: int = signal.SIGTERM
    log_limit: int | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | CappedLog | None = field(default=None, init=False, repr=False)

    def start(self) -> "HelperProcess":
        args = [os.fspath(a) for a in self.argv]
        search_path = (self.env if self.env is not None else os.environ).get("PATH", os.defpath)
        if shutil.which(args[0], path=search_path) is None:  # said now, not late from setpriv
            raise CommandError(f"cannot start {self.name} ({args[0]}): not found or not executable")
        argv, preexec = _dying_with_parent(args) if self.die_with_parent else (args, None)
        sink: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path and self.log_limit:
            self._log = CappedLog(self.log_path, self.log_limit)
            sink = self._log.write_fd
        elif self.log_path:
            self._log = sink = open(self.log_path, "ab")
        try:
            self._popen = subprocess.Popen(
                argv,
                stdin=None if self.inherit_stdio else subprocess.DEVNULL,
                stdout=None if self.inherit_stdio else sink,
                stderr=None if self.inherit_stdio else sink,
                env=dict(self.env) if self.env is not None else None,
                pass_fds=tuple(self.pass_fds),
                preexec_fn=preexec,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise CommandError(f"cannot start {self.name} ({args[0]}): {exc.strerror}") from exc
        if isinstance(self._log, CappedLog):
            self._log.handed_over()
        return self

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was not started"
        return self._popen.pid

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, lines: int = 5) -> str:
        if isinstance(self._log, CappedLog) and not self.alive():
            self._log.close(0.5)  # what the helper wrote last is still in the pipe
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes()[-4096:].decode(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_for_path(self, path: Path, timeout: float) -> None:
        """Wait until the helper has created `path` (its socket, typically)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.alive():
                detail = self.log_tail(1)
                raise CommandError(f"{self.name} exited with status {self.returncode()}"
                                   + (f": {detail}" if detail else ""))
            if time.monotonic() > deadline:
                raise CommandError(f"{self.name} did not create {path} within {timeout:g}s")
            time.sleep(0.005)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit on its own; None if it is still running."""
        if self._popen is None:
            return None
        if timeout is not None and self._popen.poll() is None:
            _sleep_until_exit(self._popen.pid, timeout)
        try:
            return self._popen.wait(None if timeout is None else 0)
        except subprocess.TimeoutExpired:
            return None

    def signal_stop(self) -> None:
        """Ask the process to stop, without waiting: stop() then reaps it. Helpers that
        are all told first end at once, instead of one after the other."""
        if self._popen is not None and self._popen.poll() is None:
            try:
                self._popen.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 3.0) -> None:
        """Ask the process to stop, kill it after `grace` seconds, and reap it."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self.signal_stop()
            if self.wait(grace) is None:
                self._popen.kill()
                self._popen.wait()
        self._close_log()

    close = stop

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "HelperProcess":
        if self._popen is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
