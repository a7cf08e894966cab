"""The guest's size from the spec: memory and vCPUs for the limits of its containers.

As Kata sizes its guests: a pod's guest holds its base size (the template's, or the
configured one for a booted guest) plus, for each container, its limits:
- memory: `linux.resources.memory.limit`, in MiB, rounded up to virtio-mem's 2 MiB blocks;
- vCPUs: ceil(`cpu.quota` / `cpu.period`), or else the count of `cpu.cpus` (a cpuset).
An update changes the limits it names; the others stay as the container had them.
A container without limits adds nothing. The guest only grows: a container that goes, or
an update that lowers a limit, leaves it as it is (memory taken back from a guest is a
slow, failure-prone unplug; Kata does not shrink memory either).

What the guest may grow to is capped (see `cap`): beyond it, a warning and the capped
size, not an error, as Kata does: the container still starts, with its limits enforced by
the guest's cgroups, over fewer vCPUs or less memory than they would allow.

`fit_guest_to` (the CLI: create, update) asks the process holding the guest to grow it
(the control op "fit", vmrun/sandbox.py); `PodSize` there keeps each container's share,
until `forget_guest_share` (delete) drops it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import astuple, dataclass, field
from pathlib import Path

log = logging.getLogger("vmrun.sizing")

_MIB = 1 << 20
MEMORY_BLOCK_MIB = 2  # virtio-mem's block on x86 (vmrun/hypervisor/resize.py)


@dataclass(frozen=True)
class Size:
    vcpus: int = 0
    memory_mib: int = 0

    def __add__(self, other: "Size") -> "Size":
        return Size(self.vcpus + other.vcpus, self.memory_mib + other.memory_mib)


# What the kernel (and runc) take for a quota set without a period: 100 ms.
DEFAULT_CPU_PERIOD = 100000


@dataclass(frozen=True)
class Limits:
    """The limits of one container that size its guest, as linux.resources gives them;
    None: not given (an update leaves it as it was)."""

    memory: int | None = None  # bytes; -1 or 0: no limit
    quota: int | None = None  # cpu.quota in µs per period; -1 or 0: no limit
    period: int | None = None
    cpus: str | None = None  # a cpuset list

    @property
    def says_nothing(self) -> bool:
        return self == Limits()

    def updated(self, newer: "Limits") -> "Limits":
        """These limits after an update: what it gives replaces, what it omits stays."""
        return Limits(*(old if new is None else new for old, new in
                        zip(astuple(self), astuple(newer))))

    @property
    def share(self) -> Size:
        """The vCPUs and memory these limits add to the guest."""
        memory_mib = 0
        if self.memory is not None and self.memory > 0:
            memory_mib = _round_up(math.ceil(self.memory / _MIB), MEMORY_BLOCK_MIB)
        vcpus = 0
        if self.quota is not None and self.quota > 0:
            period = self.period if self.period is not None and self.period > 0 else DEFAULT_CPU_PERIOD
            vcpus = math.ceil(self.quota / period)
        elif self.cpus:
            vcpus = cpuset_count(self.cpus)
        return Size(vcpus, memory_mib)


def _number(value: object) -> int | None:
    # JSON numbers; bools are ints in Python but not limits.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cpuset_count(cpus: str) -> int:
    """How many CPUs a cpuset list names ("0-2,4" is 4); 0 for one that is not a list."""
    count = 0
    for part in cpus.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            return 0
        count += int(last) - int(first) + 1 if dash else 1
        if dash and int(last) < int(first):
            return 0
    return count


def limits_of(resources: dict) -> Limits:
    """The sizing limits in `resources` (an OCI LinuxResources object). A value of the
    wrong type counts as "no limit" (0), not as "not given"."""
    memory = resources.get("memory") if isinstance(resources.get("memory"), dict) else {}
    cpu = resources.get("cpu") if isinstance(resources.get("cpu"), dict) else {}

    def given(section: dict, key: str) -> int | None:
        return None if key not in section else (_number(section[key]) or 0)

    cpus = cpu.get("cpus") if "cpus" in cpu else None
    return Limits(memory=given(memory, "limit"), quota=given(cpu, "quota"), period=given(cpu, "period"),
                  cpus=None if cpus is None else (cpus if isinstance(cpus, str) else ""))


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


def cap(wanted: Size, limit: Size) -> tuple[Size, list[str]]:
    """`wanted` within `limit`, and a warning for each part cut down."""
    warnings = []
    if wanted.vcpus > limit.vcpus:
        warnings.append(f"the guest needs {wanted.vcpus} vCPUs for its containers' limits; it gets its "
                        f"maximum, {limit.vcpus}")
    if wanted.memory_mib > limit.memory_mib:
        warnings.append(f"the guest needs {wanted.memory_mib} MiB of memory for its containers' limits; it gets "
                        f"its maximum, {limit.memory_mib} MiB")
    return Size(min(wanted.vcpus, limit.vcpus), min(wanted.memory_mib, limit.memory_mib)), warnings


def grown(current: Size, target: Size) -> Size:
    """Never smaller than the guest already is."""
    return Size(max(current.vcpus, target.vcpus), max(current.memory_mib, target.memory_mib))


@dataclass
class PodSize:
    """The size a pod's guest should have: its base plus each container's share, capped."""

    base: Size
    limit: Size
    limits: dict[str, Limits] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fit(self, container_id: str, resources: dict, current: Size) -> tuple[Size, list[str]]:
        """Record the container's limits from `resources` (created, or updated); the size
        the guest should grow to from `current`, and warnings for what was capped."""
        with self._lock:
            self.limits[container_id] = self.limits.get(container_id, Limits()).updated(limits_of(resources))
            wanted = self.base
            for each in self.limits.values():
                wanted = wanted + each.share
        target, warnings = cap(wanted, self.limit)
        return grown(current, target), warnings

    def forget(self, container_id: str) -> None:
        with self._lock:
            self.limits.pop(container_id, None)


def fit_guest_to(vm_dir: Path, container_id: str, resources: dict) -> None:
    """Grow the guest at `vm_dir` so that `resources` (linux.resources of container
    `container_id`, or an update of them) fit, beside its other containers."""
    if limits_of(resources).says_nothing:
        return  # no limit that sizes the guest: no call to its daemon at all
    from vmrun.control import CONTROL_SOCKET, control_call

    result = control_call(Path(vm_dir) / CONTROL_SOCKET, "fit", container_id=container_id,
                          resources=_sizing_part(resources))
    for warning in (result or {}).get("warnings", []) if isinstance(result, dict) else []:
        log.warning("%s", warning)


def forget_guest_share(vm_dir: Path, container_id: str) -> None:
    """Container `container_id` is gone from the guest at `vm_dir`: its share no longer
    counts when the guest is next grown (a restarted container, a new id, must not add its
    limits twice). The guest keeps its size. Best effort: a guest that is gone has no
    shares to keep."""
    from vmrun.control import CONTROL_SOCKET, ControlError, control_call

    try:
        control_call(Path(vm_dir) / CONTROL_SOCKET, "unfit", timeout=10.0, container_id=container_id)
    except ControlError as exc:
        log.debug("the guest's share of %s was not released: %s", container_id, exc)


def _sizing_part(resources: dict) -> dict:
    # Only what sizing reads crosses the control socket (devices lists can be long).
    return {key: resources[key] for key in ("memory", "cpu") if isinstance(resources.get(key), dict)}

