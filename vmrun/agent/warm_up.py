"""A throwaway container the agent runs once, under TCG, so that the host's first container
finds crun's code and the kernel's container code already translated.

Under TCG a guest instruction runs only once QEMU has translated its block, and a clone's
QEMU starts with nothing translated: its first `crun run` translates crun, the dynamic
loader and the kernel's namespace, mount, cgroup and exec code (about 33,000 blocks, most
of that call's time). Meanwhile one of the guest's two vCPUs, and a host core, sit idle
while the host hot-plugs the clone's devices and sets up its sandbox. The agent runs this
container then, on that vCPU; QEMU's translations are shared by all vCPUs. A clone's
`vmrun run` of /bin/true is about 45 to 75 ms faster for it (docs/performance.md).

The host asks for it (`vmrun.warm_up=1` on the kernel command line) only under TCG (with
KVM there is nothing to translate) and for guests with a vCPU to spare (with one it only
delays the agent). It runs once per guest: in a booted guest as the agent starts, in a
template's clones as soon as they are resumed (the first device added after the template
was saved: the hot-plug of the clone's own). It is nobody's container: its own crun root
and cgroup, no network namespace, no files of the sandbox. crun removes it when it ends,
or the agent forces it away when it failed; only its bundle (a config and empty mount
points) stays in /run. Nothing of it is fatal: errors are logged.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from vmrun.agent.crun import CRUN, write_json
from vmrun.agent.processes import Spawner
from vmrun.common.default_spec import default_spec

WARM_UP_BUNDLE = "/run/vmrun/warm-up"
WARM_UP_CRUN_ROOT = "/run/vmrun/crun-warm-up"
WARM_UP_ID = "vmrun-warm-up"
# Outside /vmrun, where crun puts the sandbox's containers: no container id can clash.
WARM_UP_CGROUP = "/vmrun-warm-up"
_BUSYBOX = "/usr/bin/busybox"
_RUN_TIMEOUT = 60.0
_NETLINK_KOBJECT_UEVENT = 15
_KERNEL_UEVENTS = 1  # the multicast group the kernel sends uevents to


def warm_up_spec(rootfs: str) -> dict[str, Any]:
    """`vmrun spec`'s (runc's) default spec, running /bin/true (busybox, bound in), without a
    terminal, in its own cgroup, and without a network namespace: a container's new one is
    the agent's spare one, already made."""
    spec = default_spec()
    spec["process"].update(terminal=False, args=["/bin/true"], env=["PATH=/bin"])
    spec["root"]["path"] = rootfs
    spec["hostname"] = WARM_UP_ID
    spec["mounts"].append({"destination": "/bin/true", "type": "bind", "source": _BUSYBOX, "options": ["rbind", "ro"]})
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    linux["cgroupsPath"] = WARM_UP_CGROUP
    return spec


class WarmUp:
    """`prepare()` the container once; `run_soon()` or `run_after_resume()` runs it in a thread."""

    def __init__(self, spawner: Spawner, log: Callable[[str], None], bundle: str = WARM_UP_BUNDLE):
        self._spawner = spawner
        self._log = log
        self._bundle = Path(bundle)

    def prepare(self) -> None:
        rootfs = self._bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        write_json(self._bundle / "config.json", warm_up_spec(str(rootfs)))

    def _crun(self, *args: str) -> list[str]:
        return [CRUN, "--root", WARM_UP_CRUN_ROOT, *args]

    def run(self) -> bool:
        """Run the container to its end; True when it ran."""
        started = time.monotonic()
        try:
            result = self._spawner.run(self._crun("run", "--bundle", str(self._bundle), WARM_UP_ID),
                                       timeout=_RUN_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - only a speed-up: logged, never fatal
            self._log(f"warm-up container not run: {exc}")
            return False
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            self._log(f"warm-up container failed ({result.returncode}): {message[-1] if message else ''}")
            self._force_away()
            return False
        self._log(f"warm-up container ran in {time.monotonic() - started:.3f}s")
        return True

    def _force_away(self) -> None:
        """What a failed or killed crun left: its state and its cgroup."""
        try:
            self._spawner.run(self._crun("delete", "--force", WARM_UP_ID), timeout=_RUN_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - as in run()
            self._log(f"warm-up container not removed: {exc}")

    def run_soon(self) -> None:
        threading.Thread(target=self.run, name="warm-up", daemon=True).start()

    def run_after_resume(self, events: socket.socket | None = None) -> threading.Thread | None:
        """In a template: run once the guest is resumed as a clone, whose first uevents are
        the hot-plug of its devices. `events` (a uevent socket, made now when None) is made
        before the template is saved, so no event of the template's own boot counts."""
        if events is None:
            try:
                events = uevent_socket()
            except OSError as exc:
                self._log(f"no warm-up container in clones: {exc}")
                return None
        thread = threading.Thread(target=self._run_once_device_added, args=(events,), name="warm-up", daemon=True)
        thread.start()
        return thread

    def _run_once_device_added(self, events: socket.socket) -> None:
        with events:
            wait_for_device_added(events)
        self.run()


def uevent_socket() -> socket.socket:
    events = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_KOBJECT_UEVENT)
    try:
        events.bind((0, _KERNEL_UEVENTS))
    except OSError:
        events.close()
        raise
    return events


def wait_for_device_added(events: socket.socket) -> None:
    """Until the kernel says a device was added ("add@/devices/..."). An error (an overflow
    of the socket's buffer: a burst of events) means events came: enough as well."""
    try:
        while not events.recv(8192).startswith(b"add@"):
            pass
    except OSError:
        pass
