"""The guest's size from its containers' limits: the arithmetic, the caps, the machine."""

from pathlib import Path

import pytest

from vmrun.agent import hotplug
from vmrun.hypervisor.accel import Acceleration
from vmrun.hypervisor.qemu import VMSpec, qemu_command
from vmrun.hypervisor.resize import GuestCounts, ResizeError, growth_limit, wait_for_guest
from vmrun.sizing import PodSize, Size, cap, cpuset_count, fit_guest_to, grown, limits_of

GIB = 1 << 30
MIB = 1 << 20


@pytest.mark.parametrize("resources, share", [
    ({}, Size(0, 0)),
    ({"memory": {"limit": 2 * GIB}}, Size(0, 2048)),
    ({"memory": {"limit": 100 * MIB + 1}}, Size(0, 102)),  # whole 2 MiB virtio-mem blocks
    ({"memory": {"limit": -1}}, Size(0, 0)),  # unlimited: nothing to hold
    ({"memory": {"reservation": GIB}}, Size(0, 0)),
    ({"cpu": {"quota": 300000, "period": 100000}}, Size(3, 0)),
    ({"cpu": {"quota": 150000, "period": 100000}}, Size(2, 0)),  # ceil
    ({"cpu": {"quota": 50000}}, Size(1, 0)),  # the kernel's default period, 100 ms
    ({"cpu": {"quota": -1, "period": 100000}}, Size(0, 0)),
    ({"cpu": {"cpus": "0-2,5"}}, Size(4, 0)),
    ({"cpu": {"quota": 100000, "period": 100000, "cpus": "0-3"}}, Size(1, 0)),  # the quota rules
    ({"cpu": {"shares": 1024}}, Size(0, 0)),  # shares are weights, not CPUs
    ({"cpu": {"quota": True, "period": 1, "cpus": 7}, "memory": {"limit": "lots"}}, Size(0, 0)),
])
def test_the_share_resources_ask_for(resources, share):
    assert limits_of(resources).share == share


def test_resources_that_name_no_sizing_limit_say_nothing():
    assert limits_of({"pids": {"limit": 5}, "cpu": {"shares": 2}, "memory": {"swap": 1}}).says_nothing
    assert not limits_of({"memory": {"limit": -1}}).says_nothing


@pytest.mark.parametrize("cpus, count", [("0", 1), ("0-3", 4), ("1,3,5-6", 4), ("", 0), ("3-1", 0), ("x", 0)])
def test_cpuset_count(cpus, count):
    assert cpuset_count(cpus) == count


def test_an_update_replaces_what_it_names_and_keeps_the_rest():
    limits = limits_of({"memory": {"limit": 2 * GIB}, "cpu": {"quota": 300000, "period": 100000}})
    assert limits.updated(limits_of({"memory": {"limit": 3 * GIB}})).share == Size(3, 3072)
    # `vmrun update --cpu-quota` alone: the container's period stays.
    assert limits.updated(limits_of({"cpu": {"quota": 100000}})).share == Size(1, 2048)
    assert limits.updated(limits_of({"cpu": {"period": 50000}})).share == Size(6, 2048)
    assert limits.updated(limits_of({"pids": {"limit": 10}})) == limits


def test_caps_warn_for_each_part_cut_down():
    assert cap(Size(4, 1024), Size(8, 4096)) == (Size(4, 1024), [])
    size, warnings = cap(Size(12, 9000), Size(8, 4096))
    assert size == Size(8, 4096)
    assert len(warnings) == 2 and "12 vCPUs" in warnings[0] and "4096 MiB" in warnings[1]


def test_the_guest_never_shrinks():
    assert grown(Size(4, 2048), Size(2, 4096)) == Size(4, 4096)


def test_a_pod_holds_its_base_plus_every_containers_share():
    pod = PodSize(base=Size(2, 512), limit=Size(8, 16384))
    limits = {"memory": {"limit": 2 * GIB}, "cpu": {"quota": 300000, "period": 100000}}
    assert pod.fit("sandbox", {}, Size(2, 512)) == (Size(2, 512), [])
    assert pod.fit("app", limits, Size(2, 512)) == (Size(5, 2560), [])
    assert pod.fit("sidecar", {"memory": {"limit": 256 * MIB}}, Size(5, 2560)) == (Size(5, 2816), [])
    # An update grows the container's share; a lower one leaves the guest as big as it is.
    assert pod.fit("app", {"memory": {"limit": 3 * GIB}}, Size(5, 2816)) == (Size(5, 3840), [])
    assert pod.fit("app", {"memory": {"limit": GIB}}, Size(5, 3840)) == (Size(5, 3840), [])
    assert pod.limits["app"].share == Size(3, 1024)
    # Too much for the machine: capped, with a warning, never an error.
    size, warnings = pod.fit("big", {"cpu": {"cpus": "0-15"}}, Size(5, 3840))
    assert size == Size(8, 3840) and warnings


def test_a_container_gone_counts_no_more():
    pod = PodSize(base=Size(1, 512), limit=Size(8, 16384))
    limits = {"memory": {"limit": GIB}, "cpu": {"quota": 200000, "period": 100000}}
    assert pod.fit("app-1", limits, Size(1, 512)) == (Size(3, 1536), [])
    pod.forget("app-1")
    # Restarted under a new id: the same limits fit in the guest as it already is.
    assert pod.fit("app-2", limits, Size(3, 1536)) == (Size(3, 1536), [])
    pod.forget("never-there")


def spec(**kwargs) -> VMSpec:
    values = dict(name="t", qemu="qemu-system-x86_64", acceleration=Acceleration("tcg", "test"), vcpus=2,
                  memory_mib=512, kernel=Path("/k"), initrd=Path("/i"), kernel_params="", console_log=Path("/c"))
    return VMSpec(**{**values, **kwargs})


def test_the_machine_can_grow_to_its_maxima():
    args = qemu_command(spec(max_vcpus=8, max_memory_mib=16384), Path("/q.sock"))
    assert args[args.index("-smp") + 1] == "2,maxcpus=8"
    assert args[args.index("-m") + 1] == "512M,maxmem=16384M"
    joined = " ".join(args)
    assert "memory-backend-memfd,id=hotmem-ram,size=15872M,share=on" in joined  # shared: vhost-user maps it
    assert "virtio-mem-pci,id=hotmem,memdev=hotmem-ram,requested-size=0" in joined


def test_a_machine_without_maxima_is_fixed():
    args = qemu_command(spec(), Path("/q.sock"))
    assert args[args.index("-smp") + 1] == "2" and args[args.index("-m") + 1] == "512M"
    assert "virtio-mem-pci" not in " ".join(args)


def test_growth_is_limited_by_the_machine_and_the_host():
    tcg = spec(max_vcpus=8, max_memory_mib=16384)
    assert growth_limit(tcg, host_cpus=2, host_memory=24000) == Size(8, 16384)
    # Memory: no more than the host has, in whole virtio-mem blocks above the base.
    assert growth_limit(tcg, host_cpus=2, host_memory=4001) == Size(8, 4000)
    # vCPUs: under KVM no more than the host's CPUs (Kata's default_maxvcpus), never below the base.
    kvm = spec(acceleration=Acceleration("kvm", "test"), vcpus=2, max_vcpus=8, max_memory_mib=16384)
    assert growth_limit(kvm, host_cpus=4, host_memory=24000) == Size(4, 16384)
    assert growth_limit(kvm, host_cpus=1, host_memory=256) == Size(2, 512)


def test_waiting_for_the_guest_ends_when_it_counts_enough_or_fails_in_one_line():
    counts = iter([GuestCounts(2, 100), GuestCounts(4, 100), GuestCounts(5, 300)])
    assert wait_for_guest(lambda: next(counts), vcpus=5, memory_bytes=300, timeout=5) == GuestCounts(5, 300)
    with pytest.raises(ResizeError, match="took 2 of 5 vCPUs"):
        wait_for_guest(lambda: GuestCounts(2, 0), vcpus=5, memory_bytes=0, timeout=0.05)


def test_resources_without_limits_do_not_call_the_sandbox(tmp_path):
    fit_guest_to(tmp_path, "c", {})  # no control socket there: would fail if it called
    fit_guest_to(tmp_path, "c", {"pids": {"limit": 5}, "cpu": {"shares": 2}})


def test_uevents_are_parsed():
    message = b"add@/devices/system/cpu/cpu4\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu4\0SUBSYSTEM=cpu\0SEQNUM=9\0"
    assert hotplug.parse_uevent(message) == ("add", "/devices/system/cpu/cpu4", "cpu")


def test_hot_added_cpus_and_memory_blocks_are_brought_online(tmp_path, monkeypatch):
    sysfs = tmp_path / "sys"
    cpus, memory = sysfs / "devices/system/cpu", sysfs / "devices/system/memory"
    for name, state in (("cpu0", None), ("cpu1", "1"), ("cpu2", "0"), ("cpu3", "0")):
        (cpus / name).mkdir(parents=True)
        if state is not None:
            (cpus / name / "online").write_text(state + "\n")
    (cpus / "cpufreq").mkdir()
    (memory / "memory32").mkdir(parents=True)
    (memory / "memory32" / "state").write_text("offline\n")
    monkeypatch.setattr(hotplug, "_SYSFS", str(sysfs))
    monkeypatch.setattr(hotplug, "_CPUS", str(cpus))
    monkeypatch.setattr(hotplug, "_MEMORY", str(memory))
    assert hotplug.online("/devices/system/cpu/cpu2", "cpu")
    assert not hotplug.online("/devices/system/cpu/cpu2", "cpu")  # already online
    assert not hotplug.online("/devices/system/cpu/../../../etc", "cpu")
    assert hotplug.online_all() == 2  # cpu3 and memory32
    assert (cpus / "cpu3" / "online").read_text() == "1"
    assert (memory / "memory32" / "state").read_text() == "online"
