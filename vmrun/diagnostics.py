"""`vmrun check`: what this host offers and what vmrun will use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmrun.config import Config
from vmrun.errors import VmrunError
from vmrun.hypervisor.accel import detect_acceleration
from vmrun.hypervisor.virtiofsd import find_virtiofsd
from vmrun.hypervisor.vsock.transports import kernel_vsock_available
from vmrun.proc import run


@dataclass(frozen=True)
class Finding:
    item: str
    ok: bool
    detail: str


def _qemu(config: Config) -> Finding:
    try:
        version = run([config.qemu, "--version"], timeout=10).stdout.decode().splitlines()[0]
    except VmrunError as exc:
        return Finding("QEMU", False, str(exc))
    return Finding("QEMU", True, version)


def _virtiofsd(config: Config) -> Finding:
    try:
        return Finding("virtiofsd", True, find_virtiofsd(config.virtiofsd))
    except VmrunError as exc:
        return Finding("virtiofsd", False, str(exc))


def _image(config: Config) -> Finding:
    if config.kernel or config.initrd:
        missing = [p for p in (config.kernel, config.initrd) if not Path(p).is_file()]
        return Finding("guest image", not missing,
                       f"configured kernel {config.kernel}, initrd {config.initrd}"
                       + (f"; missing: {', '.join(missing)}" if missing else ""))
    from guest.image_cache import find_image

    image = find_image(config.image_dir)
    if image is None:
        return Finding("guest image", False, f"not built in {config.image_dir}: run `vmrun image build`")
    release = image.manifest.get("kernel", {}).get("release", "?")
    return Finding("guest image", True,
                   f"{image.key} ({image.size_bytes / 2**20:.1f} MiB, kernel {release}) in {config.image_dir}")


def _template(config: Config) -> Finding:
    """The template new sandboxes clone: its definition must load, or every create fails."""
    if not config.template:
        return Finding("template", True, "none: every sandbox boots")
    from vmrun.hypervisor.templates import TemplateDefinition

    try:
        definition = TemplateDefinition.load(config.template)
    except VmrunError as exc:
        return Finding("template", False, str(exc))
    return Finding("template", True, f"{definition.name}: {definition.vcpus} vCPUs, {definition.memory_mib} MiB")


def _pod_network(config: Config) -> Finding:
    """A pod's interfaces reach its guest through taps, made on /dev/net/tun."""
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return Finding("pod network", False, f"/dev/net/tun: {exc.strerror} (pods cannot get their network)")
    return Finding("pod network", True, f"{config.network_model} model (taps on /dev/net/tun)")


def check(config: Config) -> list[Finding]:
    acceleration = detect_acceleration(config.acceleration, config.run_dir)
    vsock = ("kernel vhost-vsock (/dev/vhost-vsock)" if kernel_vsock_available()
             else "vmrun's vhost-user vsock backend (no usable /dev/vhost-vsock)")
    return [
        Finding("acceleration", True, f"{acceleration.name}: {acceleration.reason}"),
        Finding("vsock", True, vsock),
        _qemu(config),
        _virtiofsd(config),
        _image(config),
        _template(config),
        _pod_network(config),
    ]
