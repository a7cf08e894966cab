"""`vmrun monitor`: the metrics of a running pod, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

_MIB = 1 << 20
_BOOT_MIB = 512  # the guest's memory_mib (vm_env's config leaves the default)
_LIMIT_MIB = 256  # the container's: the guest grows by it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str, deadline: float) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by name and sorted labels; retried until the monitor listens."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def check_pod_metrics(vm_env, phases: set[str]) -> None:
    """Start a container, scrape a monitor, stop it: the pod's series, with `phases`."""
    bundle = vm_env.bundle("watched", ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"].setdefault("resources", {})["memory"] = {"limit": _LIMIT_MIB * _MIB}
    (bundle / "config.json").write_text(json.dumps(spec))
    created = vm_env.vmrun("create", "--bundle", str(bundle), "watched", detached=True)
    monitor = None
    try:
        assert created.returncode == 0
        assert vm_env.vmrun("start", "watched").returncode == 0
        port = free_port()
        monitor = vm_env.popen("monitor", "--listen", f"127.0.0.1:{port}",
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        samples = scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30)

        assert samples[("vmrun_pods", ())] == 1
        assert samples[("vmrun_pool_idle_guests", ())] == 0
        for process in ("qemu", "virtiofsd", "vsock_backend", "daemon"):
            labels = (("process", process), ("sandbox", "watched"))
            assert samples[("vmrun_pod_process_rss_bytes", labels)] > 0, process
            assert samples[("vmrun_pod_process_cpu_seconds_total", labels)] >= 0, process
        assert samples[("vmrun_pod_process_cpu_seconds_total", (("process", "qemu"), ("sandbox", "watched")))] > 0
        # 512 MiB at boot (vmrun.toml's default, the default template's), grown (virtio-mem)
        # for the container's limit at create.
        memory = samples[("vmrun_pod_guest_memory_bytes", (("sandbox", "watched"),))]
        assert memory >= (_BOOT_MIB + _LIMIT_MIB) * _MIB, memory
        timings = {dict(labels)["phase"]: value for (name, labels), value in samples.items()
                   if name == "vmrun_pod_start_seconds"}
        assert set(timings) == phases, timings
        assert 0 < timings["helpers_started"] <= timings["qemu_started"] <= timings["agent_ready"] \
            <= timings["sandbox_created"], timings

        # Each scrape reads the host afresh: the guest's CPU time only grows.
        again = scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30)
        key = ("vmrun_pod_process_cpu_seconds_total", (("process", "qemu"), ("sandbox", "watched")))
        assert again[key] >= samples[key]

        monitor.send_signal(signal.SIGTERM)
        _, err = monitor.communicate(timeout=15)
        assert monitor.returncode == 0, err
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        vm_env.vmrun("delete", "--force", "watched")


def test_a_booted_pods_metrics(vm_env):
    check_pod_metrics(vm_env, {"helpers_started", "qemu_started", "agent_ready", "sandbox_created"})


def test_a_cloned_pods_metrics(vm_env):
    vm_env.use_templates()  # the first sandbox builds the template
    check_pod_metrics(vm_env, {"clone_restored", "helpers_started", "qemu_started", "agent_ready",
                               "sandbox_created"})
