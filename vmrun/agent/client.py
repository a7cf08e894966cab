"""The host's client of the in-guest agent (gRPC over the host-side vsock bridge)."""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import grpc

from vmrun.agent import agent_pb2 as pb
from vmrun.agent import agent_pb2_grpc
from vmrun.errors import AgentError, AgentGoneError
from vmrun.network.scan import PodInterface

# Output chunks can be large; stdin chunks are bounded by the sender.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def _error(exc: grpc.RpcError) -> AgentError:
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = exc.code() if hasattr(exc, "code") else None
    # UNAVAILABLE is gRPC's word for a transport that broke or never connected.
    kind = AgentGoneError if code == grpc.StatusCode.UNAVAILABLE else AgentError
    return kind(f"agent: {details}")


class AgentClient:
    """Calls into one guest's agent; every failure becomes an AgentError."""

    def __init__(self, unix_socket: str, call_timeout: float = 60.0):
        self._channel = grpc.insecure_channel(f"unix:{unix_socket}", options=_CHANNEL_OPTIONS)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)
        self._timeout = call_timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: object, timeout: float | None = -1.0) -> object:
        try:
            return getattr(self._stub, name)(request, timeout=self._timeout if timeout == -1.0 else timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def health(self) -> bool:
        return bool(self._call("Health", pb.Empty(), timeout=10.0).serving)

    def guest_details(self) -> pb.GuestDetails:
        return self._call("GetGuestDetails", pb.Empty())

    def create_sandbox(self, sandbox_id: str, hostname: str, shared_fs_tag: str, debug: bool = False) -> str:
        response = self._call(
            "CreateSandbox",
            pb.CreateSandboxRequest(
                sandbox_id=sandbox_id,
                hostname=hostname,
                shared_fs_tag=shared_fs_tag,
                host_time_ns=time.time_ns(),
                entropy=os.urandom(64),
                debug=debug,
            ),
        )
        return response.kernel_release

    def refresh_guest(self, hostname: str) -> None:
        """Clock, entropy and hostname for a guest that was made before its pod (pool, template)."""
        request = pb.RefreshGuestRequest(host_time_ns=time.time_ns(), entropy=os.urandom(64), hostname=hostname)
        self._call("RefreshGuest", request)

    def destroy_sandbox(self, sandbox_id: str) -> None:
        self._call("DestroySandbox", pb.DestroySandboxRequest(sandbox_id=sandbox_id))

    def create_container(self, container_id: str, guest_spec: dict, start: bool = False) -> int:
        request = pb.CreateContainerRequest(container_id=container_id, spec_json=json.dumps(guest_spec).encode(),
                                            start=start)
        return self._call("CreateContainer", request).pid

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", pb.ContainerRequest(container_id=container_id))

    def remove_container(self, container_id: str, force: bool = False) -> None:
        self._call("RemoveContainer", pb.RemoveContainerRequest(container_id=container_id, force=force))

    def exec_process(self, container_id: str, exec_id: str, process: dict) -> int:
        request = pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process_json=json.dumps(process).encode()
        )
        return self._call("ExecProcess", request).pid

    def wait_process(self, container_id: str, exec_id: str = "") -> int:
        """Block until the process exits; its runc-style exit status (128+N on signal N)."""
        return self.wait_exit(container_id, exec_id).exit_status

    def wait_exit(self, container_id: str, exec_id: str = "") -> pb.WaitProcessResponse:
        """Block until the process exits: its status, and its container's OOM kills so far."""
        request = pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        return self._call("WaitProcess", request, timeout=None)

    def watch_oom(self) -> Iterator[pb.OOMEvent]:
        """OOM kills in the guest's containers as they happen, until the iterator is closed."""
        try:
            yield from self._stub.WatchOOM(pb.Empty())
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def signal_process(self, container_id: str, signal: int, exec_id: str = "", all_processes: bool = False) -> None:
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
        )
        self._call("SignalProcess", request)

    def pause_container(self, container_id: str) -> None:
        self._call("PauseContainer", pb.ContainerRequest(container_id=container_id))

    def resume_container(self, container_id: str) -> None:
        self._call("ResumeContainer", pb.ContainerRequest(container_id=container_id))

    def update_container(self, container_id: str, resources: dict) -> None:
        request = pb.UpdateContainerRequest(container_id=container_id, resources_json=json.dumps(resources).encode())
        self._call("UpdateContainer", request)

    def stats(self, container_id: str) -> pb.StatsContainerResponse:
        return self._call("StatsContainer", pb.ContainerRequest(container_id=container_id))

    def configure_interface(self, interface: PodInterface) -> pb.Interface:
        """Give the guest's NIC with the interface's MAC its name, MTU, addresses, routes and
        neighbours; what the guest then has."""
        configured = self._call("UpdateInterface", pb.UpdateInterfaceRequest(interface=pb.Interface(
            name=interface.name, mac=interface.mac, mtu=interface.mtu,
            addresses=[pb.IPAddress(address=a.address, prefix_length=a.prefix_len) for a in interface.addresses])))
        routes = [pb.Route(destination=f"{r.destination}/{r.prefix_len}" if r.destination else "",
                           gateway=r.gateway, device=configured.name, scope=r.scope) for r in interface.routes]
        if routes:
            self._call("UpdateRoutes", pb.UpdateRoutesRequest(routes=pb.Routes(routes=routes)))
        if interface.neighbors:
            self._call("AddNeighbors", pb.AddNeighborsRequest(neighbors=[
                pb.Neighbor(address=n.address, mac=n.mac, device=configured.name) for n in interface.neighbors]))
        return configured

    def remove_interface(self, mac: str) -> None:
        self._call("RemoveInterface", pb.RemoveInterfaceRequest(mac=mac))

    def list_routes(self) -> list[pb.Route]:
        return list(self._call("ListRoutes", pb.Empty()).routes)

    def list_processes(self, container_id: str) -> list[pb.ProcessInfo]:
        return list(self._call("ListProcesses", pb.ContainerRequest(container_id=container_id)).processes)

    def resize_tty(self, container_id: str, rows: int, columns: int, exec_id: str = "") -> None:
        request = pb.ResizeTtyRequest(container_id=container_id, exec_id=exec_id, rows=rows, columns=columns)
        self._call("ResizeTty", request)
