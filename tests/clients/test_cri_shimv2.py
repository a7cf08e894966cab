"""containerd's CRI plugin runs pods through vmrun's shim v2 (docs/callers.md, snippet
containerd-shimv2: the runtime handler "vmrun" is `io.containerd.vmrun.v2`).

One pod on CNI's bridge network with two containers: one guest and one shim process for
the whole pod, the containers' statistics from the guest's cgroups, and a container the
guest's OOM killer ends reported OOMKilled.
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest
from cri_env import BUSYBOX_IMAGE, RUNTIME_HANDLER, cri_session, processes_mentioning
from leftovers import mounts_under, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.clients]

RPC_TIMEOUT = 240
MiB = 1 << 20


@pytest.fixture(scope="module")
def cri(guest_image, vm_templates_dir):
    yield from cri_session(vm_templates_dir, flavor="shim-v2")


def call(cri, method: str, request, timeout: float = RPC_TIMEOUT):
    try:
        return getattr(cri.runtime, method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        pytest.fail(f"CRI {method} failed: {exc.code()}: {exc.details()}\n{cri.diagnostics()}")


def shims(cri) -> list[str]:
    return [p for p in processes_mentioning(str(cri.base)) if "vmrun.shimv2.main" in p]


def container(cri, pod_id: str, pod_config, name: str, command: list[str], memory_limit: int = 0) -> str:
    api = cri.api
    resources = api.LinuxContainerResources(memory_limit_in_bytes=memory_limit) if memory_limit else None
    container_id = call(cri, "CreateContainer", api.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=pod_config,
        config=api.ContainerConfig(metadata=api.ContainerMetadata(name=name),
                                   image=api.ImageSpec(image=f"docker.io/library/{BUSYBOX_IMAGE}"),
                                   command=command, log_path=f"{name}.log",
                                   linux=api.LinuxContainerConfig(resources=resources)))).container_id
    call(cri, "StartContainer", api.StartContainerRequest(container_id=container_id))
    return container_id


def test_a_pod_of_two_containers_is_one_guest_and_one_shim(cri):
    api = cri.api
    pod_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="vmrun-shimv2", uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(cri.log_dir), linux=api.LinuxPodSandboxConfig())
    pod_id = call(cri, "RunPodSandbox", api.RunPodSandboxRequest(config=pod_config,
                                                                   runtime_handler=RUNTIME_HANDLER)).pod_sandbox_id
    try:
        pod_ip = call(cri, "PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
        # `hog` holds 72 MiB (dd's buffer, blocked writing to a pipe nobody reads).
        hog = container(cri, pod_id, pod_config, "hog", ["sh", "-c", "dd if=/dev/zero bs=72M count=1 | sleep 600"],
                        memory_limit=256 * MiB)
        app = container(cri, pod_id, pod_config, "app", ["sh", "-c", "echo app-up; exec sleep 600"])

        # ---- one guest, one shim process for the pod's three tasks (pause, hog, app)
        assert len(shims(cri)) == 1, shims(cri)
        assert len(cri.qemu_processes()) == 1 and len(cri.vm_dirs()) == 1
        kernels = {call(cri, "ExecSync", api.ExecSyncRequest(container_id=c, cmd=["uname", "-r"], timeout=60))
                   .stdout.decode().strip() for c in (hog, app)}
        assert len(kernels) == 1 and os.uname().release not in kernels, kernels
        addresses = call(cri, "ExecSync", api.ExecSyncRequest(container_id=app, cmd=["ip", "-o", "-4", "addr"],
                                                              timeout=60))
        assert f"inet {pod_ip}/24" in addresses.stdout.decode(), addresses

        # ---- statistics: the guest's cgroup of each container
        def hog_memory() -> int:
            stats = call(cri, "ContainerStats", api.ContainerStatsRequest(container_id=hog)).stats
            return stats.memory.working_set_bytes.value
        wait_for(lambda: hog_memory() >= 64 * MiB, 60, message="hog's 72 MiB in its statistics")
        listed = {s.attributes.id for s in call(cri, "ListContainerStats", api.ListContainerStatsRequest()).stats}
        assert {hog, app} <= listed

        # ---- UpdateContainerResources reaches the container's cgroup in the guest
        call(cri, "UpdateContainerResources", api.UpdateContainerResourcesRequest(
            container_id=app, linux=api.LinuxContainerResources(memory_limit_in_bytes=200 * MiB)))
        # Without a cgroup namespace of its own, the container sees the guest's hierarchy.
        limit = call(cri, "ExecSync", api.ExecSyncRequest(container_id=app, cmd=[
            "sh", "-c", 'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"'], timeout=60))
        assert limit.stdout.decode().strip() == str(200 * MiB), limit

        # ---- the guest's OOM killer: reason OOMKilled
        oom = container(cri, pod_id, pod_config, "oom", ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"],
                        memory_limit=64 * MiB)

        def oom_status():
            status = call(cri, "ContainerStatus", api.ContainerStatusRequest(container_id=oom)).status
            return status if status.state == api.CONTAINER_EXITED else None
        status = wait_for(oom_status, 60, message="the OOM-killed container exited")
        assert (status.exit_code, status.reason) == (137, "OOMKilled"), status
        assert len(shims(cri)) == 1

        for container_id in (hog, app, oom):
            call(cri, "StopContainer", api.StopContainerRequest(container_id=container_id, timeout=5))
            call(cri, "RemoveContainer", api.RemoveContainerRequest(container_id=container_id))
    finally:
        call(cri, "StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        call(cri, "RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    containerd_pid = cri.containerd.pid
    wait_for(lambda: not processes_mentioning(str(cri.base), exclude=(containerd_pid,)) and not cri.vm_dirs()
             and not mounts_under(cri.base / "run"), 60, message="the pod's shim, guest and mounts gone")
