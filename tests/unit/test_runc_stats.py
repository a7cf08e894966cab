import json

from vmrun.runc_stats import UNLIMITED, runc_stats

# What the agent sends for a container of a 64 MiB limit (StatsContainer's cgroup_stats_json).
DETAIL = {
    "cpu": {"usage_usec": 1500, "user_usec": 1000, "system_usec": 500, "nr_periods": 4, "nr_throttled": 1,
            "throttled_usec": 20},
    "memory": {"anon": 4096, "file": 8192}, "memory_current": 12288, "memory_max": 64 << 20,
    "pids_current": 2, "pids_max": 0, "swap_current": 0, "swap_max": 0,
    "memory_events": {"max": 3, "oom_kill": 1},
    "io": [{"major": 254, "minor": 0, "rbytes": 100, "wbytes": 0, "rios": 2, "wios": 0}],
}


def stats(detail=DETAIL, limit=64 << 20):
    return runc_stats(cpu_usage_ns=1_500_000, memory_usage=12288, memory_limit=limit, pids_current=2, detail=detail)


def test_the_keys_runc_always_prints_are_there():
    assert set(stats()) == {"cpu", "cpuset", "memory", "pids", "blkio", "hugetlb", "intel_rdt", "network_interfaces"}
    assert stats()["network_interfaces"] is None and stats()["hugetlb"] == {}


def test_cpu_memory_and_pids_as_runc_on_cgroup_v2():
    result = stats()
    assert result["cpu"] == {"usage": {"total": 1_500_000, "kernel": 500_000, "user": 1_000_000},
                             "throttling": {"periods": 4, "throttledPeriods": 1, "throttledTime": 20_000}}
    memory = result["memory"]
    assert memory["cache"] == 8192 and memory["raw"] == {"anon": 4096, "file": 8192}
    assert memory["usage"] == {"limit": 64 << 20, "usage": 12288, "failcnt": 0}
    assert memory["swap"] == {"limit": UNLIMITED, "usage": 12288, "failcnt": 0}  # memory + swap, as v1 counted
    assert result["pids"] == {"current": 2}  # no limit: omitted, as Go's omitempty does


def test_no_memory_limit_is_the_largest_uint64_not_zero():
    assert stats(limit=0)["memory"]["usage"]["limit"] == UNLIMITED == 18446744073709551615


def test_io_as_blkio_entries():
    assert stats()["blkio"] == {
        "ioServiceBytesRecursive": [{"major": 254, "op": "Read", "value": 100}, {"major": 254, "op": "Write"}],
        "ioServicedRecursive": [{"major": 254, "op": "Read", "value": 2}, {"major": 254, "op": "Write"}],
    }


def test_what_a_guest_gets_wrong_is_absent_not_an_error():
    lying = {"cpu": "x", "memory": {"file": -5, "anon": "many"}, "io": [1, {"major": True}], "swap_max": 1.5}
    result = stats(detail=lying)
    assert result["cpu"]["usage"] == {"total": 1_500_000, "kernel": 0, "user": 0}
    assert "cache" not in result["memory"] and result["memory"]["swap"]["limit"] == UNLIMITED
    json.dumps(result)
    assert stats(detail=[])["memory"]["usage"]["limit"] == 64 << 20
