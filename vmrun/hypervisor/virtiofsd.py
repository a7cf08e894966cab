"""virtiofsd: shares a sandbox's directory with its guest over vhost-user-fs."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from vmrun.capped_log import LOG_LIMIT
from vmrun.errors import CommandError, HypervisorError
from vmrun.hypervisor.devices import QemuDevice
from vmrun.hypervisor.mode_supervisor import ModeSupervisor
from vmrun.log import debugging
from vmrun.proc import HelperProcess, run, stdlib_module_command

_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
_START_TIMEOUT = 5.0


def find_virtiofsd(configured: str = "") -> str:
    if configured:
        return configured
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise HypervisorError("virtiofsd not found (install qemu-system-common, or set virtiofsd in vmrun.toml)")


def _is_rust_virtiofsd(binary: str) -> bool:
    # The Rust virtiofsd (newer distributions) takes --shared-dir; QEMU's C one takes -o source=.
    return "--shared-dir" in run([binary, "--help"], check=False).stdout.decode(errors="replace")


# Without these capabilities the host kernel refuses device nodes and file capabilities,
# and clears S_ISUID/S_ISGID whenever file data changes (a rewritten setuid file loses
# them). They do not stop `chmod 4755` or a create with that mode: the seccomp filter does.
_DROPPED_CAPABILITIES = "-mknod:-fsetid:-setfcap"


def virtiofsd_args(binary: str, socket_path: Path, shared_dir: Path, debug: bool = False) -> list[str]:
    # No announce-submounts: with it each host mount under the share (a container's rootfs,
    # its volumes) is a submount of its own in the guest, and the guest's kernel (Debian's
    # 6.1) hit "Busy inodes after unmount of virtiofs" then "kernel BUG at fs/super.c" when a
    # container's exit dropped the last reference to one: 5 in 600 soak runs, 0 in 300
    # without (tests/stress). The cost: one st_dev for the whole share in the guest.
    if _is_rust_virtiofsd(binary):
        return [binary, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}", "--cache=auto",
                "--sandbox=chroot", f"--modcaps={_DROPPED_CAPABILITIES}", *(["--log-level=debug"] if debug else [])]
    return [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}", "-o", "cache=auto",
            "-o", "sandbox=chroot", "-o", f"modcaps={_DROPPED_CAPABILITIES}", *(["-o", "log_level=debug"] if debug else [])]


_PID_FILE_DIR = Path("/var/run/virtiofsd")
VIRTIOFSD_SOCKET = "virtiofsd.sock"  # its name in the sandbox's directory


def pid_file_for(socket_path: Path) -> Path:
    """The pid file virtiofsd keeps for the socket `socket_path` (its path, / as .)."""
    return _PID_FILE_DIR / (str(socket_path).replace("/", ".") + ".pid")


class Virtiofsd(HelperProcess):
    """One virtiofsd serving `shared_dir` on `socket_path`; listening once started.

    Nothing the guest creates through it gains privilege on the host (README's security
    model): virtiofsd runs without CAP_MKNOD, CAP_FSETID and CAP_SETFCAP, under a seccomp
    filter installed before it is executed (seccomp_exec.py), whose set-id chmods a
    supervisor thread of ours applies without the bits (mode_supervisor.py). No one part
    is enough: without the capabilities a chmod 4755 or a setuid create still lands; the
    filter alone leaves a rewritten setuid file its bit."""

    def __init__(self, binary: str, socket_path: Path, shared_dir: Path, log_path: Path):
        super().__init__("virtiofsd", virtiofsd_args(binary, socket_path, shared_dir, debugging()), log_path=log_path,
                         log_limit=LOG_LIMIT)
        self.socket_path = socket_path
        self.modes = ModeSupervisor("virtiofsd")

    def device(self, tag: str) -> QemuDevice:
        """The guest's vhost-user-fs device; the guest mounts the share by `tag`."""
        return QemuDevice("vhost-user-fs-pci", "virtiofs0", {"tag": tag}, backend_socket=self.socket_path)

    def start(self) -> "Virtiofsd":
        self.launch()
        self.wait_started()
        return self

    def launch(self) -> "Virtiofsd":
        """Start virtiofsd without waiting for it to listen (work can overlap its start)."""
        if self._popen is not None:
            return self  # launched already (argv is wrapped from here on)
        binary = str(self.argv[0])
        if shutil.which(binary) is None:
            raise CommandError(f"cannot start virtiofsd ({binary}): not found or not executable")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.argv, self.env = stdlib_module_command("vmrun.hypervisor.seccomp_exec", str(theirs.fileno()),
                                                        *map(str, self.argv))
            self.pass_fds = (theirs.fileno(),)
            super().start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            self.modes.serve(ours, self.pid)
        except BaseException:
            ours.close()
            self.stop()  # its set-id chmods would wait for an answer forever
            raise
        return self

    def wait_started(self) -> None:
        try:
            self.wait_for_path(self.socket_path, _START_TIMEOUT)
        except Exception as exc:
            self.stop()
            raise HypervisorError(str(exc)) from None

    def stop(self, grace: float = 3.0) -> None:
        super().stop(grace)
        self.modes.join(1.0)  # it ends as virtiofsd does
        self.socket_path.unlink(missing_ok=True)
        # virtiofsd (C) locks a pid file named after its socket and never removes it.
        pid_file_for(self.socket_path).unlink(missing_ok=True)

    close = stop
