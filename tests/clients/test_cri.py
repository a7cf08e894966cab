"""containerd's CRI plugin (the kubelet's side of the API, spoken over gRPC) drives vmrun.

A private containerd in a network namespace of its own has a runtime handler "vmrun"
(runc v2 shim with BinaryName = vmrun). Over the CRI v1 API this test runs a host-network
pod with that handler, a busybox container in it, ExecSync, and the whole stop/remove
sequence, and checks that the pod is one guest and that nothing is left afterwards.
Stubs: tests/clients/cri_env.py generates them from Debian's containerd source package.
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest
from cri_env import (
    BUSYBOX_IMAGE,
    RUNTIME_HANDLER,
    CriEnv,
    cri_session,
    mounts_under,
    processes_mentioning,
    shim_socket,
)
from leftovers import wait_for
from netns_http import fetch_in_netns

from vmrun.config import load_config
from vmrun.sandbox import vm_dir_for

pytestmark = [pytest.mark.integration, pytest.mark.clients]

# The container: says it is ready, then waits; on SIGTERM it says so and exits 42, so the
# status after StopContainer proves the signal reached it (unhandled, it would be 137).
STOP_EXIT = 42
APP_SCRIPT = f"trap 'echo got-TERM; exit {STOP_EXIT}' TERM; echo app-ready; while :; do sleep 1 & wait $!; done"
RPC_TIMEOUT = 240  # a cold guest under TCG on a loaded 2-core host


@pytest.fixture(scope="module")
def cri(guest_image, vm_templates_dir):
    yield from cri_session(vm_templates_dir)


class Steps:
    """CRI calls that fail with the RPC's error and vmrun's side of the story; timings."""

    def __init__(self, env: CriEnv) -> None:
        self.env = env
        self.timings: list[tuple[str, float]] = []

    def __call__(self, method: str, request, timeout: float = RPC_TIMEOUT):
        started = time.monotonic()
        try:
            response = getattr(self.env.runtime, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            pytest.fail(f"CRI {method} failed: {exc.code()}: {exc.details()}\n{self.env.diagnostics()}")
        self.timings.append((method, time.monotonic() - started))
        return response

    def wait_for(self, what: str, predicate, timeout: float = 30.0):
        try:
            return wait_for(predicate, timeout, interval=0.2, message=f"waiting for {what}")
        except AssertionError as exc:
            pytest.fail(f"{exc}\n{self.env.diagnostics()}")

    def report(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings)


def test_version_and_status(cri):
    api = cri.api
    version = cri.runtime.Version(api.VersionRequest(), timeout=30)
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    status = cri.runtime.Status(api.StatusRequest(), timeout=30).status
    conditions = {c.type: c.status for c in status.conditions}
    assert conditions.get("RuntimeReady") is True, status


def test_pod_lifecycle_in_one_guest(cri):
    api = cri.api
    step = Steps(cri)
    started = time.monotonic()

    pod_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="vmrun-cri", uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(cri.log_dir),
        # Host network: no CNI needed. No hostname: runc (and vmrun) refuse one without a UTS ns.
        linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NODE))),
    )
    pod_id = step("RunPodSandbox", api.RunPodSandboxRequest(config=pod_config,
                                                            runtime_handler=RUNTIME_HANDLER)).pod_sandbox_id
    pod = step("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert pod.state == api.SANDBOX_READY
    assert pod.runtime_handler == RUNTIME_HANDLER

    container_id = step("CreateContainer", api.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=pod_config,
        config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="app"),
            image=api.ImageSpec(image=f"docker.io/library/{BUSYBOX_IMAGE}"),
            command=["sh", "-c", APP_SCRIPT],
            log_path="app.log",
            linux=api.LinuxContainerConfig(),
        ))).container_id
    step("StartContainer", api.StartContainerRequest(container_id=container_id))
    status = step("ContainerStatus", api.ContainerStatusRequest(container_id=container_id)).status
    assert status.state == api.CONTAINER_RUNNING, status
    log = cri.log_dir / "app.log"
    # CRI log lines: "<time> stdout F app-ready". The container's stdout reached the shim's pipe.
    step.wait_for("the container's first output in its CRI log",
                  lambda: log.exists() and " stdout F app-ready" in log.read_text(), timeout=60)

    # ---- one guest for the pod: the sandbox's; the container went into it
    vm_dirs = cri.vm_dirs()
    assert vm_dirs == [vm_dir_for(load_config(cri.vmrun_config), pod_id)], \
        f"expected exactly the pod sandbox's guest dir, got {vm_dirs}"
    qemus = cri.qemu_processes()
    assert len(qemus) == 1, f"expected one QEMU for the pod, got {qemus}"
    assert sorted(p.name for p in cri.vmrun_states()) == sorted([pod_id, container_id])
    daemons = [p for p in processes_mentioning(str(cri.base)) if "vmrun.sandbox_daemon" in p]
    assert len(daemons) == 1 and f"--id {pod_id}" in daemons[0], f"expected one guest holder: {daemons}"
    shims = [p for p in processes_mentioning(cri.address) if "containerd-shim" in p]
    assert len(shims) == 1 and f"-id {pod_id}" in shims[0], f"expected one shim for the pod: {shims}"
    socket = shim_socket(cri.address, "k8s.io", pod_id)
    assert socket.exists(), f"the pod's shim socket should be {socket}"

    kernel = step("ExecSync", api.ExecSyncRequest(container_id=container_id, cmd=["uname", "-r"], timeout=60))
    assert kernel.exit_code == 0, kernel
    guest_release = kernel.stdout.decode().strip()
    assert guest_release and guest_release != os.uname().release, \
        f"the container's kernel {guest_release!r} should be the guest's, not the host's {os.uname().release!r}"

    # ---- ExecSync: exit code and the two streams kept apart
    result = step("ExecSync", api.ExecSyncRequest(
        container_id=container_id, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=60))
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")

    # ---- stop: SIGTERM reaches the container, its exit code reaches the CRI
    step("StopContainer", api.StopContainerRequest(container_id=container_id, timeout=30))
    status = step("ContainerStatus", api.ContainerStatusRequest(container_id=container_id)).status
    assert status.state == api.CONTAINER_EXITED, status
    assert status.exit_code == STOP_EXIT, f"exit code {status.exit_code} ({status.reason}): SIGTERM not handled?"
    assert " stdout F got-TERM" in log.read_text()
    step("RemoveContainer", api.RemoveContainerRequest(container_id=container_id))
    assert not step("ListContainers", api.ListContainersRequest()).containers

    # the guest outlives the pod's container: it is the sandbox's
    assert len(cri.vm_dirs()) == 1 and len(cri.qemu_processes()) == 1

    step("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    pod = step("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert pod.state == api.SANDBOX_NOTREADY
    step("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not step("ListPodSandbox", api.ListPodSandboxRequest()).items

    # ---- nothing left: no guest, no vmrun process, no shim, no mount, no state
    containerd_pid = cri.containerd.pid

    def clean():
        return (not processes_mentioning(str(cri.base), exclude=(containerd_pid,)) and not cri.vm_dirs()
                and not cri.vmrun_states() and not mounts_under(cri.base) and not socket.exists())

    step.wait_for("the pod's guest, shim and mounts to go", clean, timeout=60)
    print(f"\nCRI timings: {step.report()}; total {time.monotonic() - started:.1f}s")


def test_pod_ip_from_the_cni_bridge_serves_from_the_guest(cri):
    """A pod on CNI's bridge network: its IP is on the guest's eth0, and it serves there."""
    api = cri.api
    step = Steps(cri)
    pod_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="vmrun-web", uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(cri.log_dir), linux=api.LinuxPodSandboxConfig())
    pod_id = step("RunPodSandbox", api.RunPodSandboxRequest(config=pod_config,
                                                            runtime_handler=RUNTIME_HANDLER)).pod_sandbox_id
    try:
        pod_ip = step("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
        assert pod_ip.startswith("198.18.8."), pod_ip
        container_id = step("CreateContainer", api.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=pod_config,
            config=api.ContainerConfig(
                metadata=api.ContainerMetadata(name="web"),
                image=api.ImageSpec(image=f"docker.io/library/{BUSYBOX_IMAGE}"),
                command=["sh", "-c", "mkdir -p /tmp/www && echo pod-web > /tmp/www/index.html && "
                                     "exec httpd -f -p 8080 -h /tmp/www"],
                log_path="web.log", linux=api.LinuxContainerConfig()))).container_id
        step("StartContainer", api.StartContainerRequest(container_id=container_id))
        addresses = step("ExecSync", api.ExecSyncRequest(container_id=container_id,
                                                         cmd=["ip", "-o", "-4", "addr", "show"], timeout=60))
        assert f"inet {pod_ip}/24" in addresses.stdout.decode(), addresses
        # From the node (containerd's netns, where the bridge is): the pod's IP answers.
        assert fetch_in_netns(cri.netns, f"http://{pod_ip}:8080/index.html") == "pod-web\n"
        step("StopContainer", api.StopContainerRequest(container_id=container_id, timeout=5))
        step("RemoveContainer", api.RemoveContainerRequest(container_id=container_id))
    finally:
        step("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        step("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    containerd_pid = cri.containerd.pid
    step.wait_for("the pod's guest to go", lambda: not processes_mentioning(
        str(cri.base), exclude=(containerd_pid,)) and not cri.vm_dirs(), timeout=60)
