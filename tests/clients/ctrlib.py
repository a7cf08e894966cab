"""Helpers for the tests that drive vmrun through containerd and ctr (see conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import images  # noqa: F401 - beside this file (conftest puts this directory on sys.path)
from leftovers import mounts_under, wait_for  # noqa: F401 - wait_for: also for the tests

CLIENTS_DIR = Path(__file__).resolve().parent
# Next to the interpreter: the console script `pip install -e .` made (not a pyenv shim).
VMRUN = Path(sys.executable).parent / "vmrun"
CONTAINERD_RUN = Path("/run/containerd")  # where containerd puts shim sockets and fifos regardless
BBX_IMAGE = "docker.io/library/bbx:latest"
PAUSE_IMAGE = "docker.io/library/pause:1"
BOOT_TIMEOUT = 180  # one ctr call that boots a guest under TCG, on a loaded 2-core host


# ---- small helpers ----



def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _is_zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _entries(path: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in path.iterdir())
    except FileNotFoundError:
        return []


class OutputReader:
    """Collects a pipe's bytes in a thread, so tests can wait for text without blocking."""

    def __init__(self, stream) -> None:
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            with self._lock:
                self.data += chunk

    @property
    def text(self) -> str:
        with self._lock:
            return self.data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


# ---- the daemon ----

class PrivateContainerdPaths:
    """Where a test's private containerd, and the vmrun it drives, keep their files."""

    base: Path

    @property
    def address(self) -> str:
        return str(self.base / "c.sock")

    @property
    def vmrun_config(self) -> Path:
        return self.base / "vmrun.toml"

    @property
    def run_dir(self) -> Path:  # vmrun's: run_dir/vm/<hash of sandbox id> per guest
        return self.base / "run"


@dataclass
class Containerd(PrivateContainerdPaths):
    base: Path
    process: subprocess.Popen
    prefix: str  # every container and exec id of this session starts with it
    namespaces: list[str] = field(default_factory=list)
    ids: set[tuple[str, str]] = field(default_factory=set)  # (namespace, container id) ever used

    @property
    def runc_root(self) -> Path:  # vmrun's --root is <this>/<namespace>
        return self.base / "vroot"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "VMRUN_CONFIG": str(self.vmrun_config)}

    def bundle(self, namespace: str, container_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / namespace / container_id

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [line for line in text if "level=debug" not in line]
        return "\n".join(keep[-lines:])

    def ctr_argv(self, namespace: str, *args: str) -> list[str]:
        return ["ctr", "--address", self.address, "-n", namespace, *args]

    def runtime_flags(self) -> list[str]:
        """How ctr swaps vmrun in: the runc v2 shim with BinaryName and Root options."""
        return ["--runtime", "io.containerd.runc.v2", "--runc-binary", str(VMRUN),
                "--runc-root", str(self.runc_root)]

    def namespace(self, name: str, runtime_flags: list[str] | None = None) -> "Ctr":
        """A ctr of namespace `name` (images imported on first use); `runtime_flags` swap
        in another runtime than runtime_flags()'s."""
        ctr = Ctr(self, name, runtime_flags)
        if name not in self.namespaces:
            self.namespaces.append(name)
            archives = self.base / "images"
            for archive, ref in ((archives / "bbx-oci.tar", BBX_IMAGE), (archives / "pause-docker.tar", PAUSE_IMAGE)):
                result = ctr("image", "import", str(archive), timeout=120)
                assert result.returncode == 0, f"ctr image import {archive.name}: {result.stderr}"
                assert ref in result.stdout, result.stdout
        return ctr

    # -- what the session's containers may leave behind --

    def shim_socket(self, namespace: str, container_id: str) -> Path:
        # containerd 1.6: sha256 of "<containerd address>/<namespace>/<id>" under /run/containerd/s
        digest = hashlib.sha256(f"{self.address}/{namespace}/{container_id}".encode()).hexdigest()
        return CONTAINERD_RUN / "s" / digest

    def our_fifo_dirs(self) -> list[Path]:
        """ctr's fifo dirs holding only files named after this session's ids."""
        found = []
        for directory in (CONTAINERD_RUN / "fifo").glob("*"):
            names = _entries(directory)
            if names and all(name.startswith(self.prefix) for name in names):
                found.append(directory)
        return found

    def processes(self) -> dict[int, str]:
        """Processes naming the private dir, or running with its VMRUN_CONFIG; not containerd."""
        marker = str(self.base) + "/"
        env_marker = b"VMRUN_CONFIG=" + str(self.vmrun_config).encode() + b"\0"
        found = {}
        for entry in Path("/proc").iterdir():
            pid = entry.name
            if not pid.isdigit() or int(pid) in (os.getpid(), self.process.pid) or _is_zombie(pid):
                continue
            cmdline = _cmdline(pid)
            if marker in cmdline + " " or env_marker in _environ(pid):
                found[int(pid)] = cmdline[:160]
        return found

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of vmrun's or of the tests' containers still here (empty lists: none)."""
        tasks_state = self.state / "io.containerd.runtime.v2.task"
        tasks_root = self.root / "io.containerd.runtime.v2.task"
        return {
            "processes": [f"{pid}: {cmd}" for pid, cmd in sorted(self.processes().items())],
            "mounts": [m for m in mounts_under(self.base)],
            "vmrun vm dirs": _entries(self.run_dir / "vm"),
            "vmrun states": [f"{ns}/{name}" for ns in _entries(self.runc_root)
                             for name in _entries(self.runc_root / ns)],
            "task bundles": [f"{base.parent.name}/{ns}/{name}" for base in (tasks_state, tasks_root)
                             for ns in _entries(base) for name in _entries(base / ns)],
            "shim sockets": [str(p) for ns, cid in sorted(self.ids) if (p := self.shim_socket(ns, cid)).exists()],
            "fifo dirs": [str(p) for p in self.our_fifo_dirs()],
        }

    def wait_settled(self, timeout: float = 20.0) -> dict[str, list[str]]:
        """leftovers(), after giving exiting shims and guests time to go."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leftovers()
            # fifo dirs of killed ctr clients stay for good: do not wait on them
            if not any(v for k, v in found.items() if k != "fifo dirs") or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


class Ctr:
    """`ctr --address <private> -n <namespace>`, with helpers for the session's ids."""

    def __init__(self, ctd: Containerd, namespace: str, runtime_flags: list[str] | None = None) -> None:
        self.ctd = ctd
        self.namespace = namespace
        self.runtime_flags = runtime_flags if runtime_flags is not None else ctd.runtime_flags()

    def cid(self, name: str) -> str:
        """A container (or exec) id of this session; registered for the cleanup checks."""
        container_id = f"{self.ctd.prefix}-{name}"
        self.ctd.ids.add((self.namespace, container_id))
        return container_id

    def argv(self, *args: str) -> list[str]:
        return self.ctd.ctr_argv(self.namespace, *args)

    def __call__(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        kwargs = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run(self.argv(*args), capture_output=True, text=True, errors="replace",
                              timeout=timeout, **kwargs)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.argv(*args), start_new_session=True, **kwargs)

    def run(self, container_id: str, *command: str, flags: tuple[str, ...] = ("--rm",), image: str = BBX_IMAGE,
            timeout: float = BOOT_TIMEOUT, input: str | None = None) -> subprocess.CompletedProcess:
        """`ctr run [flags] <vmrun runtime> image id command...`."""
        return self(*self.run_args(container_id, *command, flags=flags, image=image), timeout=timeout, input=input)

    def run_args(self, container_id: str, *command: str, flags: tuple[str, ...] = ("--rm",),
                 image: str = BBX_IMAGE) -> list[str]:
        return ["run", *flags, *self.runtime_flags, image, container_id, *command]

    def tty_argv(self, *args: str) -> list[str]:
        """A ctr command line given a terminal: `script -qec "ctr ..." /dev/null`."""
        return ["script", "-qec", shlex.join(self.argv(*args)), "/dev/null"]

    def tasks(self) -> dict[str, tuple[int, str]]:
        """`ctr task ls`: id -> (pid, status)."""
        result = self("task", "ls")
        assert result.returncode == 0, result.stderr
        tasks = {}
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                tasks[fields[0]] = (int(fields[1]), fields[2])
        return tasks

    def status(self, container_id: str) -> str:
        return self.tasks().get(container_id, (0, "absent"))[1]

    def wait_status(self, container_id: str, status: str, timeout: float = 30.0) -> None:
        wait_for(lambda: self.status(container_id) == status, timeout,
                 message=f"task {container_id} {status} (now {self.status(container_id)})")

    def containers(self) -> list[str]:
        result = self("container", "ls", "-q")
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    def remove(self, container_id: str) -> None:
        """Kill, delete the task and the container, whatever state they are in (best effort)."""
        if container_id in self.tasks():
            if self.status(container_id) == "PAUSED":
                self("task", "resume", container_id)
            self("task", "kill", "-a", "-s", "SIGKILL", container_id)
            with contextlib.suppress(AssertionError):
                self.wait_status(container_id, "STOPPED", timeout=30)
            self("task", "delete", "-f", container_id, timeout=60)
        if container_id in self.containers():
            self("container", "delete", container_id, timeout=60)

    def remove_all(self) -> list[str]:
        """Remove every container of the namespace; the ids that were still there."""
        left = sorted(set(self.containers()) | set(self.tasks()))
        for container_id in left:
            self.remove(container_id)
        return left


def exit_code_warning(stderr: str, container_id: str) -> int | None:
    """The status `ctr task delete` reports: `task X exit with non-zero exit code N`, else None."""
    match = re.search(rf"task {re.escape(container_id)} exit with non-zero exit code (\d+)", stderr)
    return int(match.group(1)) if match else None


class Events:
    """`ctr events` in the background: the /tasks/exit events, as `ctr task wait` would give them."""

    def __init__(self, ctr: Ctr) -> None:
        self.proc = subprocess.Popen(ctr.argv("events"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.reader = OutputReader(self.proc.stdout)
        self.namespace = ctr.namespace

    def exits(self) -> list[dict]:
        found = []
        for line in self.reader.text.splitlines():
            if f" {self.namespace} /tasks/exit " not in f" {line} ":
                continue
            with contextlib.suppress(ValueError):
                found.append(json.loads(line[line.index("{"):]))
        return found

    def wait_exit(self, container_id: str, timeout: float = 30.0, exec_id: str | None = None) -> dict:
        wanted = exec_id or container_id

        def match():
            for event in self.exits():
                if event.get("container_id") == container_id and event.get("id", container_id) == wanted:
                    return event
            return None

        return wait_for(match, timeout, message=f"/tasks/exit event of {exec_id or container_id}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join()


