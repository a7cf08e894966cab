"""A container's cgroup v2 statistics, as the guest's agent reads them, in the shape
`runc events --stats` prints (runc's types/events.go): every key runc always prints, the
optional ones only when they have a value (Go's omitempty), and "max" limits as runc
gives them (the largest uint64).

The agent's numbers come from the guest, which may lie: they are only ever reported back,
so a value of the wrong type counts as absent, never as an error.
"""

from __future__ import annotations

UNLIMITED = (1 << 64) - 1  # runc's "max": math.MaxUint64


def _number(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _numbers(value: object) -> dict[str, int]:
    return {str(key): _number(number) for key, number in value.items()} if isinstance(value, dict) else {}


def _set(values: dict[str, object]) -> dict[str, object]:
    """Go's omitempty: the keys whose value is not zero or empty."""
    return {key: value for key, value in values.items() if value}


def _io_entries(devices: object, fields: tuple[tuple[str, str], ...]) -> list[dict[str, object]]:
    """io.stat's per-device counters as runc's blkio entries, one per (field, op)."""
    entries: list[dict[str, object]] = []
    for device in devices if isinstance(devices, list) else []:
        if not isinstance(device, dict):
            continue
        for field, op in fields:
            entries.append(_set({"major": _number(device.get("major")), "minor": _number(device.get("minor")),
                                 "op": op, "value": _number(device.get(field))}))
    return entries


def runc_stats(*, cpu_usage_ns: int, memory_usage: int, memory_limit: int, pids_current: int,
               detail: object) -> dict[str, object]:
    """runc's Stats from the agent's reply (`detail`: its cgroup_stats_json, decoded)."""
    detail = detail if isinstance(detail, dict) else {}
    cpu, memory = _numbers(detail.get("cpu")), _numbers(detail.get("memory"))
    # The agent says 0 for "max" (no limit).
    memory_limit = _number(memory_limit) or UNLIMITED
    swap_limit = _number(detail.get("swap_max")) or UNLIMITED
    return {
        "cpu": {
            "usage": {**_set({"total": _number(cpu_usage_ns)}),
                      "kernel": cpu.get("system_usec", 0) * 1000, "user": cpu.get("user_usec", 0) * 1000},
            "throttling": _set({"periods": cpu.get("nr_periods", 0), "throttledPeriods": cpu.get("nr_throttled", 0),
                                "throttledTime": cpu.get("throttled_usec", 0) * 1000}),
        },
        # cgroup v2 has no cpuset counters: runc prints them as zeros.
        "cpuset": {"cpu_exclusive": 0, "mem_hardwall": 0, "mem_exclusive": 0, "memory_migrate": 0,
                   "memory_spread_page": 0, "memory_spread_slab": 0, "memory_pressure": 0,
                   "sched_load_balance": 0, "sched_relax_domain_level": 0},
        "memory": {
            **_set({"cache": memory.get("file", 0)}),
            "usage": {"limit": memory_limit, **_set({"usage": _number(memory_usage)}), "failcnt": 0},
            # As runc on cgroup v2: swap as cgroup v1 counted it, memory and swap together.
            "swap": {"limit": swap_limit if UNLIMITED in (swap_limit, memory_limit) else swap_limit + memory_limit,
                     **_set({"usage": _number(detail.get("swap_current")) + _number(memory_usage)}), "failcnt": 0},
            **_set({"raw": memory}),
        },
        "pids": _set({"current": _number(pids_current), "limit": _number(detail.get("pids_max"))}),
        "blkio": _set({
            "ioServiceBytesRecursive": _io_entries(detail.get("io"), (("rbytes", "Read"), ("wbytes", "Write"))),
            "ioServicedRecursive": _io_entries(detail.get("io"), (("rios", "Read"), ("wios", "Write"))),
        }),
        "hugetlb": {},
        "intel_rdt": {},
        "network_interfaces": None,
    }
