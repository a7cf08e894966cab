"""Growing a running guest: vCPUs by ACPI CPU hot-plug, memory by virtio-mem.

Both work on a guest that booted and on a clone restored from a template, after it runs:
the machine (maxcpus, the virtio-mem device with nothing plugged) is the template's, and
what is added is the clone's alone.

- vCPUs: q35's ACPI CPU hot-plug (`device_add` of a CPU in a free slot that
  query-hotpluggable-cpus lists). It works with this project's boot (qboot loads QEMU's
  ACPI tables; the kernel has CONFIG_ACPI_HOTPLUG_CPU), so no template needs vCPUs
  present but offline. The kernel onlines no hot-added CPU itself: the agent does
  (vmrun/agent/hotplug.py).
- memory: the virtio-mem device's requested-size (qom-set); the guest driver plugs it in
  2 MiB blocks and the kernel onlines them (memhp_default_state=online). No DIMM slots:
  one device, one memory region that vhost-user backends map once (QEMU 7.2 gives them
  the device's whole region from the start), however often the guest grows.

Measured under TCG on a 2-CPU host, a clone's `vmrun create` took 0.2 s longer for a
2 GiB memory limit and 0.7 s longer for a 3-CPU quota (bringing each vCPU up dominates).

The guest is done when the agent counts the vCPUs online and the memory in MemTotal
(GetGuestDetails): QEMU only knows what it offered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vmrun.errors import HypervisorError
from vmrun.hypervisor.devices import QMPTarget
from vmrun.hypervisor.qemu import VIRTIO_MEM_ID, QemuVM, VMSpec
from vmrun.sizing import MEMORY_BLOCK_MIB, PodSize, Size

log = logging.getLogger("vmrun.resize")

# What a guest may grow to unless its template says otherwise. vCPUs: each possible CPU
# costs the guest kernel its per-CPU areas at boot. Memory: the virtio-mem region is
# guest-physical address space and a sparse memfd, nothing until plugged.
DEFAULT_MAX_VCPUS = 8
DEFAULT_MAX_MEMORY_MIB = 16384
_MIB = 1 << 20
_VIRTIO_MEM_PATH = f"/machine/peripheral/{VIRTIO_MEM_ID}"


class ResizeError(HypervisorError):
    """The guest could not be grown as asked (QEMU refused, or the guest did not take it)."""


@dataclass(frozen=True)
class GuestCounts:
    """What the guest itself counts: vCPUs online, and MemTotal in bytes."""

    vcpus: int
    memory_bytes: int


def present_vcpus(vm: QMPTarget) -> int:
    return sum(1 for cpu in _hotpluggable_cpus(vm) if "qom-path" in cpu)


def add_vcpus(vm: QMPTarget, count: int) -> int:
    """Hot-plug `count` vCPUs into free slots (fewer if there are not that many); how many."""
    free = [cpu for cpu in _hotpluggable_cpus(vm) if "qom-path" not in cpu]
    # Lowest ids first: the guest numbers CPUs in the order they come.
    free.sort(key=lambda cpu: tuple(sorted(cpu.get("props", {}).items())))
    added = 0
    for cpu in free[:count]:
        props = dict(cpu["props"])
        name = "vcpu-" + "-".join(str(props[key]) for key in sorted(props))
        vm.qmp("device_add", driver=cpu["type"], id=name, **props)
        added += 1
    return added


def _hotpluggable_cpus(vm: QMPTarget) -> list[dict]:
    cpus = vm.qmp("query-hotpluggable-cpus")
    if not isinstance(cpus, list):
        raise ResizeError("QEMU lists no hot-pluggable CPUs")
    return cpus


def plugged_memory_mib(vm: QMPTarget) -> int:
    """The virtio-mem memory asked for so far (the guest may not have plugged it all yet)."""
    return int(vm.qmp("qom-get", path=_VIRTIO_MEM_PATH, property="requested-size")) // _MIB  # type: ignore[arg-type]


def request_memory(vm: QMPTarget, mib: int) -> None:
    """Ask the guest to plug `mib` MiB of virtio-mem memory in all (a multiple of its block)."""
    vm.qmp("qom-set", path=_VIRTIO_MEM_PATH, property="requested-size", value=mib * _MIB)


def wait_for_guest(counts: Callable[[], GuestCounts], vcpus: int, memory_bytes: int, timeout: float) -> GuestCounts:
    """Until the guest counts at least `vcpus` vCPUs online and `memory_bytes` of memory."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        now = counts()
        if now.vcpus >= vcpus and now.memory_bytes >= memory_bytes:
            return now
        if time.monotonic() > deadline:
            raise ResizeError(
                f"the guest took {now.vcpus} of {vcpus} vCPUs and {now.memory_bytes >> 20} of "
                f"{memory_bytes >> 20} MiB of memory within {timeout:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def host_memory_mib() -> int:
    """The host's RAM (MemTotal) in MiB."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ResizeError("/proc/meminfo has no MemTotal")


def growth_limit(spec: VMSpec, host_cpus: int, host_memory: int) -> Size:
    """What the guest of `spec` may grow to: its machine's maxima, and no more memory than
    the host has (in whole virtio-mem blocks). vCPUs are capped by the host's CPUs under
    KVM only, as Kata's default_maxvcpus: there each vCPU wants a host CPU of its own. Under
    TCG a vCPU is an emulating thread the host schedules like any other, so a container's
    quota of 3 CPUs gets 3 vCPUs even on a 2-CPU host, as its cgroup would let it run 3
    threads there."""
    vcpus = max(spec.vcpus, spec.max_vcpus)
    if spec.acceleration.name == "kvm":
        vcpus = max(spec.vcpus, min(vcpus, host_cpus))
    memory = max(spec.memory_mib, min(max(spec.memory_mib, spec.max_memory_mib), host_memory))
    memory = spec.memory_mib + _round_down(memory - spec.memory_mib, MEMORY_BLOCK_MIB)
    return Size(vcpus, memory)


def _round_down(value: int, block: int) -> int:
    return value // block * block


class GuestSizer:
    """Grows a running guest to fit its containers: the control op "fit" of its sandbox.

    `guest_counts` asks the agent what the guest counts (GetGuestDetails). Requests are
    served one at a time: each reads the guest's size and grows it.
    """

    def __init__(self, vm: QemuVM, guest_counts: Callable[[], GuestCounts], timeout: float):
        self._vm = vm
        spec = vm.spec
        self._base = Size(spec.vcpus, spec.memory_mib)
        self._pod = PodSize(base=self._base, limit=growth_limit(spec, os.cpu_count() or 1, host_memory_mib()))
        self._guest_counts = guest_counts
        self._timeout = timeout
        self._lock = threading.Lock()
        # MemTotal of the guest with nothing plugged: what plugged memory adds to.
        self._base_memory_bytes: int | None = None

    def fit(self, container_id: str, resources: dict) -> dict:
        """Record the container's share and grow the guest to fit; the size, and warnings."""
        with self._lock:
            current = self.size()
            target, warnings = self._pod.fit(container_id, resources, current)
            if target != current:
                self._grow(current, target)
        return {"vcpus": target.vcpus, "memory_mib": target.memory_mib, "warnings": warnings}

    def forget(self, container_id: str) -> None:
        """The container is gone: its share counts no more (the guest keeps its size)."""
        self._pod.forget(container_id)

    def size(self) -> Size:
        """The size QEMU gives the guest now (vCPUs present, memory asked for)."""
        if not self._vm.spec.max_vcpus and not self._vm.spec.hotplug_memory_mib:
            return self._base
        vcpus = present_vcpus(self._vm) if self._vm.spec.max_vcpus else self._base.vcpus
        plugged = plugged_memory_mib(self._vm) if self._vm.spec.hotplug_memory_mib else 0
        return Size(vcpus, self._base.memory_mib + plugged)

    def _grow(self, current: Size, target: Size) -> None:
        started = time.monotonic()
        if self._base_memory_bytes is None and current.memory_mib == self._base.memory_mib:
            self._base_memory_bytes = self._guest_counts().memory_bytes
        if target.vcpus > current.vcpus:
            add_vcpus(self._vm, target.vcpus - current.vcpus)
        if target.memory_mib > current.memory_mib:
            request_memory(self._vm, target.memory_mib - self._base.memory_mib)
        # The guest is done when it counts them: a container made next sees them all.
        memory = 0 if self._base_memory_bytes is None else \
            self._base_memory_bytes + (target.memory_mib - self._base.memory_mib) * _MIB
        wait_for_guest(self._guest_counts, target.vcpus, memory, self._timeout)
        log.info("guest grown from %d vCPUs, %d MiB to %d vCPUs, %d MiB in %.3fs", current.vcpus,
                 current.memory_mib, target.vcpus, target.memory_mib, time.monotonic() - started)
