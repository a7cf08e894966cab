"""A container's statistics from its cgroup in the guest (the agent's StatsContainer), as
containerd's cgroups v2 Metrics: what `ctr task metrics`, CRI's ListContainerStats and
`docker stats` read from a shim."""

from __future__ import annotations

import json

from vmrun.shimv2.proto import cgroups_v2_metrics_pb2 as cgroups_v2

_UNLIMITED = 2**64 - 1  # "max" in a cgroup file, as containerd's cgroups package reports it

# memory.stat keys that are Metrics.memory fields of the same name.
_MEMORY_FIELDS = [f.name for f in cgroups_v2.MemoryStat.DESCRIPTOR.fields
                  if f.name not in ("usage", "usage_limit", "swap_usage", "swap_limit")]


def metrics_from_stats(stats) -> cgroups_v2.Metrics:
    """`stats`: an agent StatsContainerResponse (its cgroup_stats_json holds the files)."""
    detail = json.loads(stats.cgroup_stats_json or b"{}")
    cpu = detail.get("cpu") or {}
    memory = detail.get("memory") or {}
    events = detail.get("memory_events") or {}
    return cgroups_v2.Metrics(
        pids=cgroups_v2.PidsStat(current=detail.get("pids_current", stats.pids_current),
                                 limit=detail.get("pids_max") or _UNLIMITED),
        cpu=cgroups_v2.CPUStat(**{key: int(cpu.get(key, 0)) for key in (
            "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")}),
        memory=cgroups_v2.MemoryStat(
            usage=stats.memory_usage_bytes, usage_limit=stats.memory_limit_bytes or _UNLIMITED,
            swap_usage=detail.get("swap_current", 0), swap_limit=detail.get("swap_max") or _UNLIMITED,
            **{key: int(memory[key]) for key in _MEMORY_FIELDS if key in memory}),
        memory_events=cgroups_v2.MemoryEvents(**{key: int(events.get(key, 0)) for key in (
            "low", "high", "max", "oom", "oom_kill")}),
        io=cgroups_v2.IOStat(usage=[cgroups_v2.IOEntry(**{key: int(entry.get(key, 0)) for key in (
            "major", "minor", "rbytes", "wbytes", "rios", "wios")}) for entry in detail.get("io") or []]),
    )
