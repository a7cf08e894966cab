"""containerd 1.6's legacy `untrusted_workload_runtime`, configured by docs/callers.md.

The private containerd (tests/clients/cri_env.py, flavor "untrusted-v1") runs the doc's
version 1 snippet `containerd-untrusted-v1` (only the vmrun binary and its state root made
the test's). Over the CRI v1 API a pod annotated `io.kubernetes.cri.untrusted-workload:
"true"`, with no runtime handler, must run under vmrun through containerd's v1 shim
(`containerd-shim`, runtime `io.containerd.runtime.v1.linux`): its container sees the
guest's kernel and QEMU's CPU, the pod is one guest, and nothing is left afterwards.

The CRI plugin refuses untrusted pods that share the host's network, PID or IPC namespace,
so this pod is on the CNI bridge network.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cri_env import BUSYBOX_IMAGE, cri_session, mounts_under, processes_mentioning
from test_cri import Steps

from vmrun.config import load_config
from vmrun.sandbox import vm_dir_for

pytestmark = [pytest.mark.integration, pytest.mark.clients]

UNTRUSTED = "io.kubernetes.cri.untrusted-workload"


@pytest.fixture(scope="module")
def cri_v1(guest_image, vm_templates_dir):
    yield from cri_session(vm_templates_dir, flavor="untrusted-v1")


def test_an_untrusted_pod_runs_in_a_vmrun_guest(cri_v1):
    cri = cri_v1
    api = cri.api
    step = Steps(cri)
    pod_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="vmrun-untrusted", uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(cri.log_dir), annotations={UNTRUSTED: "true"}, linux=api.LinuxPodSandboxConfig())
    pod_id = step("RunPodSandbox", api.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    try:
        container_id = step("CreateContainer", api.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=pod_config,
            config=api.ContainerConfig(
                metadata=api.ContainerMetadata(name="app"),
                image=api.ImageSpec(image=f"docker.io/library/{BUSYBOX_IMAGE}"),
                command=["sh", "-c", "echo app-ready; exec sleep 3600"],
                log_path="untrusted.log", linux=api.LinuxContainerConfig()))).container_id
        step("StartContainer", api.StartContainerRequest(container_id=container_id))

        # vmrun ran them: its state has both, one guest for the pod, and containerd's v1 shim
        # (not the runc v2 shim) called it.
        assert sorted(p.name for p in cri.vmrun_states()) == sorted([pod_id, container_id]), \
            f"vmrun's state root {cri.runtime_root} should hold the pod and its container\n{cri.diagnostics()}"
        assert cri.vm_dirs() == [vm_dir_for(load_config(cri.vmrun_config), pod_id)]
        assert len(cri.qemu_processes()) == 1, cri.qemu_processes()
        shims = [p for p in processes_mentioning(cri.address) if "containerd-shim" in p]
        assert shims and all("containerd-shim-runc" not in p for p in shims), shims
        assert all("io.containerd.runtime.v1.linux" in p for p in shims), shims

        # The container runs in the guest: another kernel, QEMU's CPU.
        kernel = step("ExecSync", api.ExecSyncRequest(container_id=container_id, cmd=["uname", "-r"], timeout=60))
        assert kernel.exit_code == 0, kernel
        release = kernel.stdout.decode().strip()
        assert release and release != os.uname().release, \
            f"the container's kernel {release!r} should be the guest's, not the host's {os.uname().release!r}"
        cpu = step("ExecSync", api.ExecSyncRequest(container_id=container_id, cmd=["cat", "/proc/cpuinfo"],
                                                   timeout=60))
        assert "QEMU" in cpu.stdout.decode(), cpu.stdout.decode()[:500]

        step("StopContainer", api.StopContainerRequest(container_id=container_id, timeout=5))
        step("RemoveContainer", api.RemoveContainerRequest(container_id=container_id))
    finally:
        step("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        step("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    containerd_pid = cri.containerd.pid
    step.wait_for("the pod's guest, shims and mounts to go", lambda: (
        not processes_mentioning(str(cri.base), exclude=(containerd_pid,)) and not cri.vm_dirs()
        and not cri.vmrun_states() and not mounts_under(cri.base)), timeout=60)


def test_untrusted_with_host_network_is_refused(cri_v1):
    """As the doc says: the CRI plugin refuses an untrusted pod that shares the host's network."""
    import grpc

    api = cri_v1.api
    pod_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="vmrun-untrusted-host", uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(cri_v1.log_dir), annotations={UNTRUSTED: "true"},
        linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NODE))))
    with pytest.raises(grpc.RpcError) as caught:
        cri_v1.runtime.RunPodSandbox(api.RunPodSandboxRequest(config=pod_config), timeout=120)
    assert "untrusted workload with host access is not allowed" in caught.value.details()
    assert not cri_v1.vm_dirs()
