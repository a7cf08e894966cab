"""VM templates: a guest booted until its agent listens, paused and saved, for clones to
restore instead of booting.

Guest RAM lives in a file mapped share=on, so vhost-user backends (virtiofsd, the vsock
backend) can map a clone's memory; with QEMU's x-ignore-shared the saved state holds only
device state, and each clone gets a sparse copy of the RAM file. vhost-user devices
block migration, so templates have none: clones get theirs hot-plugged on spare PCIe
root ports before they resume.

Concurrency: a clone holds its template's lock shared while it copies the template's
files; replacing or removing a template takes that lock exclusively, so a clone copies
one whole template, never half of one and half of its successor. Builders of one
template take its build lock in turn, so concurrent sandboxes build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import vmrun
from vmrun.bootfiles import BootFiles
from vmrun.common.constants import agent_kernel_params
from vmrun.config import check_template_name, template_settings
from vmrun.errors import ConfigError, HypervisorError
from vmrun.hypervisor.accel import Acceleration
from vmrun.hypervisor.memory_copy import punch_zero_pages
from vmrun.hypervisor.qemu import QemuVM, VMSpec, base_kernel_params
from vmrun.hypervisor.resize import DEFAULT_MAX_MEMORY_MIB, DEFAULT_MAX_VCPUS

DEFINITIONS_DIR = Path(__file__).resolve().parents[2] / "vmtemplates"
# The agent prints this on the console once it listens (before any vsock device exists).
READY_MARKER = b"vmrun-agent: listening"
_SAVE_TIMEOUT = 60.0


@dataclass(frozen=True)
class TemplateDefinition:
    """What vmtemplates/NAME.toml says a template is."""

    name: str
    vcpus: int = 1
    memory_mib: int = 512
    kernel_params: str = ""
    hotplug_ports: int = 4
    # What clones may grow to for their containers' limits (vmrun/sizing.py).
    max_vcpus: int = DEFAULT_MAX_VCPUS
    max_memory_mib: int = DEFAULT_MAX_MEMORY_MIB

    @classmethod
    def load(cls, name: str, directory: Path = DEFINITIONS_DIR) -> "TemplateDefinition":
        path = directory / f"{check_template_name(name)}.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no template definition {path}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"template definition {path}: {exc}") from None
        definition = cls(name=name, **template_settings(data, f"template definition {path}"))  # type: ignore[arg-type]
        if definition.max_vcpus < definition.vcpus or definition.max_memory_mib < definition.memory_mib:
            raise ConfigError(f"template definition {path}: max_vcpus and max_memory_mib must be at least "
                              "vcpus and memory_mib")
        return definition

    def kernel_command_line(self, acceleration: Acceleration) -> str:
        # Fixed for the template and every clone: a clone cannot change its command line.
        agent = agent_kernel_params(acceleration.translates, self.vcpus)
        base = base_kernel_params(acceleration.translates)
        return f"{base} {agent} vmrun.template=1 {self.kernel_params}".strip()


def _file_identity(path: Path) -> str:
    # Nanosecond mtime and inode too: a rebuild in the same second, of the same size, differs.
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def fingerprint(definition: TemplateDefinition, qemu: str, files: BootFiles, acceleration: Acceleration) -> dict:
    """Everything a saved template depends on; a clone needs all of it unchanged."""
    qemu_path = Path(shutil.which(qemu) or qemu)
    return {
        "definition": asdict(definition),
        "kernel_command_line": definition.kernel_command_line(acceleration),
        "qemu": _file_identity(qemu_path),
        "kernel": _file_identity(files.kernel),
        "initrd": _file_identity(files.initrd),
        # Mapped by the template and every clone: never rewritten while they run (a new build
        # is a new file), and a template only fits the very file it was made with.
        "root": _file_identity(files.root) if files.root else "",
        "acceleration": acceleration.name,
        "vmrun": vmrun.__version__,
    }


@dataclass(frozen=True)
class Template:
    """A saved template on disk: RAM file, device state, and the record of its making."""

    path: Path

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def record_path(self) -> Path:
        return self.path / "record.json"

    def record(self) -> dict:
        return json.loads(self.record_path.read_text())

    def why_unusable(self, expected: dict) -> str:
        """"" when clones may restore it, else why not."""
        try:
            record = self.record()
        except (OSError, ValueError):
            return "its record is missing or damaged"
        if not (self.memory.is_file() and self.state.is_file()):
            return "its memory or state file is missing"
        if record.get("fingerprint") != expected:
            changed = [k for k in expected if record.get("fingerprint", {}).get(k) != expected[k]]
            return f"it was built from another {', '.join(changed) or 'setup'}"
        return ""


class TemplateStore:
    def __init__(self, root: Path):
        self.root = root

    @contextlib.contextmanager
    def _locked(self, name: str, kind: str, shared: bool) -> Iterator[None]:
        lock = self.root / f".{check_template_name(name)}.{kind}"  # before anything is made
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def in_use(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Held (shared) while a clone reads the template: it is not replaced meanwhile."""
        return self._locked(name, "lock", shared=True)

    def _replacing(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._locked(name, "lock", shared=False)

    def building(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Held while one builds the template: others wait, then find it built."""
        return self._locked(name, "build", shared=False)

    def get(self, name: str) -> Template | None:
        template = Template(self.root / check_template_name(name))
        return template if template.record_path.exists() else None

    def list(self) -> list[Template]:
        if not self.root.is_dir():
            return []
        return [Template(p) for p in sorted(self.root.iterdir()) if (p / "record.json").exists()]

    def remove(self, name: str) -> bool:
        """Remove a template, once no clone is copying it."""
        if not (self.root / check_template_name(name)).exists():
            return False  # and no lock file made for a template that never was
        with self._replacing(name):
            return self._remove_unlocked(name)

    def _remove_unlocked(self, name: str) -> bool:
        path = self.root / name
        if not path.exists():
            return False
        # Renamed, then deleted: a crash midway leaves no half template under its name.
        doomed = self.root / f".{name}.removing-{os.getpid()}"
        path.rename(doomed)
        shutil.rmtree(doomed)
        return True

    def create(self, definition: TemplateDefinition, expected: dict, work_dir: Path, *, qemu: str,
               acceleration: Acceleration, files: BootFiles) -> Template:
        """Boot the template's machine until its agent listens; save it as `definition.name`."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = self.root / f".{definition.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)  # its RAM holds the agent's memory: no one else's to read
        try:
            spec = template_vm_spec(definition, qemu=qemu, acceleration=acceleration, files=files,
                                    console_log=work_dir / "template-console.log", memory_file=staging / "memory",
                                    incoming=False)
            vm = QemuVM(spec, work_dir / "template-qmp.sock", work_dir / "template-qemu.log").start()
            try:
                _wait_for_console(vm, spec.console_log, READY_MARKER, _SAVE_TIMEOUT)
                time.sleep(0.3)  # let the agent settle into its wait for the vsock device
                started = time.monotonic()
                vm.pause()
                save_state(vm, staging / "state")
                save_seconds = time.monotonic() - started
            finally:
                vm.close()
            zeros_punched = punch_zero_pages(staging / "memory")
            (staging / "record.json").write_text(json.dumps({
                "name": definition.name,
                "fingerprint": expected,
                "created": datetime.now(timezone.utc).isoformat(),
                "save_seconds": round(save_seconds, 3),
                "zero_pages_punched_mib": round(zeros_punched / (1 << 20), 1),
            }, indent=2))
            for made in staging.iterdir():
                made.chmod(0o600)  # QEMU made the RAM file with its umask
            final = self.root / definition.name
            with self._replacing(definition.name):
                self._remove_unlocked(definition.name)
                staging.rename(final)
            return Template(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _wait_for_console(vm: QemuVM, console: Path, marker: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if marker in console.read_bytes():
                return
        except FileNotFoundError:
            pass
        if not vm.alive():
            raise HypervisorError(vm.with_console(vm.failure()))
        if time.monotonic() > deadline:
            raise HypervisorError(vm.with_console(f"the template's agent did not start within {timeout:g}s"))
        time.sleep(0.02)


def _x_ignore_shared(vm: QemuVM) -> None:
    # RAM is in a shared file: leave it out of the stream (the file is the RAM).
    vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


def save_state(vm: QemuVM, path: Path) -> None:
    """Write the paused guest's device state to `path` (QEMU writes to an fd of ours)."""
    _x_ignore_shared(vm)
    with open(path, "wb") as state:
        vm.add_fd(state.fileno(), "template-state")
        vm.qmp("migrate", uri="fd:template-state")
        _wait_migration(vm, "the template's state could not be saved")


def restore_state(vm: QemuVM, state_fd: int) -> None:
    """Load a template's device state (an open file) into a QEMU started with -incoming
    defer; it stays paused (the template was paused when saved) until resumed."""
    _x_ignore_shared(vm)
    vm.add_fd(state_fd, "template-state")  # QEMU reads its own copy of the fd
    vm.qmp("migrate-incoming", uri="fd:template-state")
    deadline = time.monotonic() + _SAVE_TIMEOUT
    while (status := vm.status()) == "inmigrate":
        if time.monotonic() > deadline:
            raise HypervisorError("the template's state could not be restored in time")
        time.sleep(0.002)
    if status != "paused":
        raise HypervisorError(f"the template's state could not be restored: QEMU is {status}")


def template_vm_spec(definition: TemplateDefinition, *, qemu: str, acceleration: Acceleration, files: BootFiles,
                     console_log: Path, incoming: bool, memory_file: Path | None = None,
                     memory_fd: int | None = None) -> VMSpec:
    """The machine of a template and of its clones: they must be the same but for RAM and -incoming."""
    return VMSpec(
        name=f"vmrun-template-{definition.name}",
        qemu=qemu,
        acceleration=acceleration,
        vcpus=definition.vcpus,
        memory_mib=definition.memory_mib,
        kernel=files.kernel,
        initrd=files.initrd,
        root_image=files.root,
        kernel_params=definition.kernel_command_line(acceleration),
        console_log=console_log,
        memory_file=memory_file,
        memory_fd=memory_fd,
        hotplug_ports=definition.hotplug_ports,
        incoming=incoming,
        free_page_reporting=True,
        max_vcpus=definition.max_vcpus,
        max_memory_mib=definition.max_memory_mib,
    )


def _wait_migration(vm: QemuVM, failure: str) -> None:
    deadline = time.monotonic() + _SAVE_TIMEOUT
    while True:
        status = vm.qmp("query-migrate").get("status")  # type: ignore[union-attr]
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"{failure}: migration {status}")
        if time.monotonic() > deadline:
            raise HypervisorError(f"{failure}: migration still {status} after {_SAVE_TIMEOUT:g}s")
        time.sleep(0.005)
