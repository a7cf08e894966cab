"""QEMU, one process per sandbox, driven over QMP with qemu.qmp."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vmrun.capped_log import LOG_LIMIT, CappedLog
from vmrun.errors import CommandError, HypervisorError
from vmrun.hypervisor.accel import Acceleration
from vmrun.proc import HelperProcess

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

_QMP_ACCEPT_TIMEOUT = 10.0
_CONSOLE_TAIL_BYTES = 4096  # enough for a last line; a guest's console file is up to LOG_LIMIT
_QBOOT = Path("/usr/share/qemu/qboot.rom")

# Cheap boot: skip crypto self-tests and legacy devices; panic powers the VM off (QEMU
# runs with -no-reboot), so a dead agent never leaves a spinning guest behind. Memory the
# host hot-plugs (virtio-mem, to fit containers' limits) comes online by itself.
BASE_KERNEL_PARAMS = (
    "console=ttyS0 quiet panic=-1 cryptomgr.notests 8250.nr_uarts=1 i8042.noaux i8042.nokbd "
    "i8042.nopnp random.trust_cpu=on rcupdate.rcu_expedited=1 no_timer_check memhp_default_state=online "
    # Initcalls of nothing the guest uses, measured slow under TCG (initcall_debug): kprobe
    # and mmio tracing, a KDF self-test, the module-signing keys (modules are unsigned).
    "initcall_blacklist=init_kprobe_trace,init_mmio_trace,crypto_kdf108_init,load_system_certificate_list"
)
# Under TCG the guest's clocksource watchdog sees its vCPU threads descheduled and drops the
# TSC for the HPET, each read of which is an emulated MMIO access under QEMU's big lock
# (a sixth of the guest's time while it moves stdio). TCG's TSC is the host's, stopped
# while the VM is and carried in its saved state: a clone's goes on from its template's.
# KVM guests keep kvm-clock.
_TCG_CLOCK_PARAMS = "tsc=reliable clocksource=tsc"


def base_kernel_params(translated: bool) -> str:
    """The guest kernel command line every vmrun guest starts with."""
    return f"{BASE_KERNEL_PARAMS} {_TCG_CLOCK_PARAMS}" if translated else BASE_KERNEL_PARAMS


# The guest's hot-pluggable memory: a virtio-mem device over a shared memfd of its own.
VIRTIO_MEM_ID = "hotmem"
_VIRTIO_MEM_BACKEND = "hotmem-ram"

# qemu.qmp logs every (expected) disconnect at warning level; we report errors ourselves.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def _qmp_failures() -> tuple[type[BaseException], ...]:
    """What qemu.qmp raises when QEMU misbehaves or goes away (EOFError on a closed socket).
    A function: qemu.qmp (with asyncio and ssl, ~25 ms) is imported only once QEMU runs."""
    from qemu.qmp import QMPError

    return (QMPError, OSError, EOFError)


@dataclass
class VMSpec:
    """What one guest is made of."""

    name: str
    qemu: str
    acceleration: Acceleration
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    kernel_params: str
    console_log: Path
    device_args: list[str] = field(default_factory=list)
    # Guest RAM in this file (a template's) or in this memfd of ours (a clone's, with its
    # template's RAM copied in), instead of an anonymous memfd QEMU makes.
    memory_file: Path | None = None
    memory_fd: int | None = None
    # Empty PCIe root ports, for devices hot-plugged later (a clone's own devices).
    hotplug_ports: int = 0
    # virtio-balloon free page reporting: the guest hands back memory it freed, and QEMU
    # punches it out of the RAM file (a template's file shrinks to what the guest uses).
    free_page_reporting: bool = False
    # Wait for migrate-incoming (a clone restoring a template's state).
    incoming: bool = False
    # What the guest may grow to after boot (vmrun/sizing.py): vCPUs hot-plugged up to
    # max_vcpus, memory by virtio-mem up to max_memory_mib. Part of the machine: a
    # template's clones have its maxima. 0: no growth.
    max_vcpus: int = 0
    max_memory_mib: int = 0
    # The guest's root: a read-only image the guest maps with DAX (guest/root_image.py).
    root_image: Path | None = None

    @property
    def hotplug_memory_mib(self) -> int:
        return max(0, self.max_memory_mib - self.memory_mib)

    @property
    def root_image_mib(self) -> int:
        return -(-self.root_image.stat().st_size // (1 << 20)) if self.root_image else 0


def _smp(spec: VMSpec) -> str:
    return f"{spec.vcpus},maxcpus={spec.max_vcpus}" if spec.max_vcpus > spec.vcpus else str(spec.vcpus)


def _memory_size(spec: VMSpec) -> str:
    # maxmem makes the device-memory region the virtio-mem and virtio-pmem devices live in.
    device_memory = spec.hotplug_memory_mib + spec.root_image_mib
    return f"{spec.memory_mib}M,maxmem={spec.memory_mib + device_memory}M" if device_memory else f"{spec.memory_mib}M"


def _root_image(spec: VMSpec) -> list[str]:
    """The root image on virtio-pmem: mapped shared and read-only, so its pages are the host
    page cache's, one copy for every guest (a guest's writes to it are dropped). Its RAM
    block is shared: a template's saved state (x-ignore-shared) leaves it out."""
    if spec.root_image is None:
        return []
    return ["-object", f"memory-backend-file,id=rootimg,mem-path={spec.root_image},"
                       f"size={spec.root_image_mib}M,share=on,readonly=on",
            "-device", "virtio-pmem-pci,memdev=rootimg,id=rootpmem"]


def _kernel_params(spec: VMSpec) -> str:
    # virtio-pmem's region sits above 4 GiB: without noforce the kernel sets up (and zeroes)
    # a 64 MiB swiotlb bounce buffer that virtio, with no ACCESS_PLATFORM, never uses.
    return f"{spec.kernel_params} swiotlb=noforce" if spec.root_image else spec.kernel_params


def _hotplug_memory(spec: VMSpec) -> list[str]:
    """The virtio-mem device, nothing plugged: the host asks for more (requested-size)
    after boot. Its RAM is shared as the rest is (vhost-user backends map it) and sparse:
    only what the guest is given and uses takes host memory. A memfd QEMU makes, also in
    clones: a template saves it with nothing plugged, so there is nothing to copy."""
    if not spec.hotplug_memory_mib:
        return []
    return ["-object", f"memory-backend-memfd,id={_VIRTIO_MEM_BACKEND},size={spec.hotplug_memory_mib}M,share=on",
            "-device", f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={_VIRTIO_MEM_BACKEND},requested-size=0"]


def _memory_backend(spec: VMSpec) -> str:
    # Shared memory: vhost-user backends (virtiofsd, the vsock backend) map guest RAM.
    size = f"id=mem,size={spec.memory_mib}M,share=on"
    if spec.memory_fd is not None:
        return f"memory-backend-file,{size},mem-path=/dev/fd/{spec.memory_fd}"  # passed to QEMU
    if spec.memory_file is not None:
        return f"memory-backend-file,{size},mem-path={spec.memory_file}"
    return f"memory-backend-memfd,{size}"


_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def hotplug_port_id(index: int) -> str:
    return f"hp{index}"


def qemu_command(spec: VMSpec, qmp_socket: Path, console: str = "") -> list[str]:
    """QEMU's argv; the guest's serial console goes to the file `console` (QEMU's view of
    it), or else to `spec.console_log`."""
    accel = spec.acceleration.name
    args = [
        spec.qemu,
        "-name", spec.name,
        "-machine", f"q35,accel={accel},memory-backend=mem",
        "-smp", _smp(spec),
        "-m", _memory_size(spec),
        "-object", _memory_backend(spec),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", _kernel_params(spec),
        # Without an entropy source the guest's first random read blocks for ~1 s.
        "-device", "virtio-rng-pci",
        "-serial", f"file:{console or spec.console_log}",
        "-chardev", f"socket,id=qmp,path={qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
        # QEMU parses what the guest writes to its devices: if that is ever exploited, the
        # process may not exec, fork, change its ids or scheduling, nor use old syscalls.
        "-sandbox", _SANDBOX,
    ]
    if spec.free_page_reporting:
        args += ["-device", "virtio-balloon-pci,free-page-reporting=on"]
    args += _hotplug_memory(spec)
    args += _root_image(spec)
    for index in range(spec.hotplug_ports):
        args += ["-device", f"pcie-root-port,id={hotplug_port_id(index)},bus=pcie.0,chassis={index + 1}"]
    if spec.incoming:
        args += ["-incoming", "defer"]
    if accel == "kvm":
        args += ["-cpu", "host"]
    if _QBOOT.exists():
        args += ["-bios", str(_QBOOT)]
    return args + spec.device_args


class QemuVM:
    """A running QEMU; `close()` quits it (killing it if it does not go)."""

    def __init__(self, spec: VMSpec, qmp_socket: Path, log_path: Path,
                 console_watch: Callable[[bytes], None] | None = None):
        self.spec = spec
        self._console_watch = console_watch  # sees the guest's console output as it comes
        self._qmp_socket = qmp_socket
        self._process = HelperProcess("qemu", qemu_command(spec, qmp_socket), log_path=log_path,
                                      stop_signal=signal.SIGKILL, log_limit=LOG_LIMIT)
        self._qmp_listener: socket.socket | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        # One QMP exchange at a time: a sandbox's control requests (NICs, growing the
        # guest) are served on threads of their own, and an fd passed must meet its getfd.
        self._qmp_lock = threading.RLock()
        self._console: CappedLog | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.alive()

    def start(self) -> "QemuVM":
        self.launch()
        return self.wait_started()

    def launch(self) -> "QemuVM":
        """Start the process; QMP is ready after wait_started(). In between, the caller may
        start other things while QEMU initialises."""
        # We listen and QEMU connects: no polling for QEMU's socket to appear.
        self._qmp_socket.unlink(missing_ok=True)
        self._qmp_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._qmp_listener.bind(str(self._qmp_socket))
            self._qmp_listener.listen(1)
            # The console through a pipe of ours, kept in spec.console_log at a bounded size.
            self._console = CappedLog(self.spec.console_log, watch=self._console_watch)
            self._process.argv = qemu_command(self.spec, self._qmp_socket, self._console.path_in_child)
            self._process.pass_fds = (self._console.write_fd,
                                      *(() if self.spec.memory_fd is None else (self.spec.memory_fd,)))
            self._process.start()
            self._console.handed_over()
        except (OSError, CommandError) as exc:
            self.close()
            raise HypervisorError(f"QEMU failed to start: {exc}") from None
        return self

    def wait_started(self) -> "QemuVM":
        """Wait until QEMU has connected to its QMP socket, and greet it."""
        assert self._qmp_listener is not None, "QEMU was not launched"
        from qemu.qmp.legacy import QEMUMonitorProtocol  # while QEMU initialises

        try:
            self._qmp = QEMUMonitorProtocol(self._accept_qmp(time.monotonic() + _QMP_ACCEPT_TIMEOUT))
            self._qmp.connect()
        except (*_qmp_failures(), TimeoutError) as exc:
            detail = self._process.log_tail(1) or str(exc) or type(exc).__name__
            self.close()
            raise HypervisorError(f"QEMU failed to start: {detail}") from None
        return self

    def _accept_qmp(self, deadline: float) -> socket.socket:
        """QEMU's QMP connection; a QEMU that exits first fails at once, not at the deadline."""
        assert self._qmp_listener is not None
        self._qmp_listener.settimeout(0.05)
        while True:
            try:
                connection, _ = self._qmp_listener.accept()
                break
            except TimeoutError:
                if not self._process.alive():
                    raise OSError("QEMU exited") from None
                if time.monotonic() > deadline:
                    raise
        self._qmp_listener.close()
        self._qmp_listener = None
        connection.settimeout(None)
        return connection

    def console_tail(self) -> str:
        """The guest console's last line, printable characters only (a guest writes it), or ''."""
        try:
            with open(self.spec.console_log, "rb") as console:
                console.seek(max(0, console.seek(0, os.SEEK_END) - _CONSOLE_TAIL_BYTES))
                tail = console.read()
        except OSError:
            return ""
        lines = [line.strip() for line in tail.decode(errors="replace").splitlines() if line.strip()]
        # After a panic its own line says more than the stack dump that ends the console.
        panics = [line for line in lines if "Kernel panic" in line]
        last = (panics or lines or [""])[-1]
        return "".join(c if c.isprintable() else "?" for c in last)

    def with_console(self, message: str) -> str:
        """`message`, and what the guest said last: why a boot failed is often only there."""
        console = self.console_tail()
        return f"{message} (guest console: {console})" if console else message

    def failure(self) -> str:
        """Why QEMU is gone, from its log."""
        tail = self._process.log_tail(2).replace("\n", "; ")
        return f"QEMU exited with status {self._process.returncode()}" + (f": {tail}" if tail else "")

    def qmp(self, command: str, **arguments: object) -> object:
        with self._qmp_lock:
            if self._qmp is None:
                raise HypervisorError("QEMU is not running")
            try:
                return self._qmp.cmd(command, **arguments)
            except _qmp_failures() as exc:
                raise HypervisorError(f"QMP {command} failed: {exc}") from None
            finally:
                self._qmp.clear_events()  # heard meanwhile (some the guest can cause): unused, not kept

    def status(self) -> str:
        """QEMU's run state: "running", "paused", ..."""
        return str(self.qmp("query-status")["status"])

    def pause(self) -> None:
        self.qmp("stop")

    def add_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of `fd` (SCM_RIGHTS) under `name`, for a device that needs it."""
        with self._qmp_lock:
            if self._qmp is None:
                raise HypervisorError("QEMU is not running")
            try:
                self._qmp.send_fd_scm(fd)
            except _qmp_failures() as exc:
                raise HypervisorError(f"cannot pass QEMU an fd: {exc}") from None
            self.qmp("getfd", fdname=name)

    def resume(self) -> None:
        self.qmp("cont")

    def signal_stop(self) -> None:
        """Kill QEMU without waiting for it; close() reaps it."""
        self._process.signal_stop()

    def close(self, grace: float = 3.0) -> None:
        """Kill QEMU and reap it. Nothing of a guest outlives it (a template's state is saved
        before), so there is nothing to shut down gracefully: a QMP quit would first stop
        every vhost-user device, a round trip to each backend."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except _qmp_failures():
                pass
            self._qmp = None
        if self._qmp_listener is not None:
            self._qmp_listener.close()
            self._qmp_listener = None
        self._process.stop(grace)
        if self._console is not None:
            self._console.close()
        self._qmp_socket.unlink(missing_ok=True)
