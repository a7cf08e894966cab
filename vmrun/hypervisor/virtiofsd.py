"""virtiofsd: shares a sandbox's directory with its guest over vhost-user-fs."""

from __future__ import annotations

import shutil
from pathlib import Path

from vmrun.errors import HypervisorError
from vmrun.hypervisor.devices import QemuDevice
from vmrun.proc import HelperProcess, run

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


def virtiofsd_args(binary: str, socket_path: Path, shared_dir: Path) -> list[str]:
    if _is_rust_virtiofsd(binary):
        return [binary, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}", "--cache=auto",
                "--sandbox=chroot", "--announce-submounts"]
    return [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}", "-o", "cache=auto",
            "-o", "sandbox=chroot", "-o", "announce_submounts"]


class Virtiofsd(HelperProcess):
    """One virtiofsd serving `shared_dir` on `socket_path`; listening once started."""

    def __init__(self, binary: str, socket_path: Path, shared_dir: Path, log_path: Path):
        super().__init__("virtiofsd", virtiofsd_args(binary, socket_path, shared_dir), log_path=log_path)
        self.socket_path = socket_path

    def device(self, tag: str) -> QemuDevice:
        """The guest's vhost-user-fs device; the guest mounts the share by `tag`."""
        return QemuDevice("vhost-user-fs-pci", "virtiofs0", {"tag": tag}, backend_socket=self.socket_path)

    def start(self) -> "Virtiofsd":
        self.launch()
        self.wait_started()
        return self

    def launch(self) -> "Virtiofsd":
        """Start virtiofsd without waiting for it to listen (work can overlap its start)."""
        super().start()
        return self

    def wait_started(self) -> None:
        try:
            self.wait_for_path(self.socket_path, _START_TIMEOUT)
        except Exception as exc:
            self.stop()
            raise HypervisorError(str(exc)) from None

    def stop(self, grace: float = 3.0) -> None:
        super().stop(grace)
        self.socket_path.unlink(missing_ok=True)

    close = stop
