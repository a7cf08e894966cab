"""vCPUs and memory the host hot-plugs into the guest come online (what udev's rules do
on a distribution; this guest has no udev).

The host grows the guest to fit its containers' limits (vmrun/sizing.py) after boot, and
in clones of a template: a vCPU by ACPI hot-plug, memory by virtio-mem. The kernel onlines
hot-added memory itself (`memhp_default_state=online` on the command line) but never a
hot-added CPU: this thread does, as the kernel announces each one ("add@/devices/system/
cpu/cpuN"), and memory blocks too should a kernel leave them offline. The host waits until
GetGuestDetails counts them, so a container made next sees them all.

Event driven: the thread sleeps in recv() until the kernel speaks, costing nothing under
TCG while no device comes. Nothing here is fatal: errors are logged.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable

from vmrun.agent.warm_up import uevent_socket

_SYSFS = "/sys"
_CPUS = "/sys/devices/system/cpu"
_MEMORY = "/sys/devices/system/memory"


def parse_uevent(message: bytes) -> tuple[str, str, str]:
    """(action, devpath, subsystem) of a kernel uevent: "add@/devices/...\\0KEY=value\\0..."."""
    fields = dict(part.partition(b"=")[::2] for part in message.split(b"\0")[1:] if b"=" in part)
    return (fields.get(b"ACTION", b"").decode(errors="replace"), fields.get(b"DEVPATH", b"").decode(errors="replace"),
            fields.get(b"SUBSYSTEM", b"").decode(errors="replace"))


def _write_if(path: str, unless: str, value: str) -> bool:
    """Write `value` to the sysfs file `path` unless it already reads `unless`; whether written."""
    try:
        with open(path) as current:
            if current.read().strip() == unless:
                return False
        with open(path, "w") as control:
            control.write(value)
        return True
    except FileNotFoundError:
        return False  # cpu0 has no online file; a block removed meanwhile


def online(devpath: str, subsystem: str) -> bool:
    """Bring the CPU or memory block at sysfs `devpath` online; whether it was offline."""
    if ".." in devpath.split("/"):
        return False
    if subsystem == "cpu" and devpath.startswith("/devices/system/cpu/cpu"):
        return _write_if(f"{_SYSFS}{devpath}/online", "1", "1")
    if subsystem == "memory" and devpath.startswith("/devices/system/memory/memory"):
        return _write_if(f"{_SYSFS}{devpath}/state", "online", "online")
    return False


def online_all() -> int:
    """Every offline CPU and memory block brought online; how many."""
    count = 0
    for directory, prefix, subsystem in ((_CPUS, "cpu", "cpu"), (_MEMORY, "memory", "memory")):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                count += online(f"{directory[len(_SYSFS):]}/{name}", subsystem)
    return count


class HotplugOnliner:
    """The thread that onlines what is hot-added, until the guest ends."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log

    def start(self) -> "HotplugOnliner":
        try:
            events = uevent_socket()
        except OSError as exc:
            self._log(f"hot-plugged vCPUs will stay offline: {exc}")
            return self
        threading.Thread(target=self._run, args=(events,), name="hotplug-online", daemon=True).start()
        return self

    def _run(self, events: socket.socket) -> None:
        online_all()  # anything added before we listened
        while True:
            try:
                message = events.recv(8192)
            except OSError:
                # Overflow (ENOBUFS): a burst of events, some lost; what they announced is
                # in sysfs.
                self._catch_up()
                continue
            if not (message.startswith(b"add@/devices/system/cpu/") or message.startswith(b"add@/devices/system/memory/")):
                continue
            action, devpath, subsystem = parse_uevent(message)
            if action != "add":
                continue
            try:
                online(devpath, subsystem)
            except OSError as exc:
                self._log(f"cannot bring {devpath} online: {exc}")

    def _catch_up(self) -> None:
        try:
            online_all()
        except OSError as exc:
            self._log(f"cannot bring hot-plugged vCPUs or memory online: {exc}")
