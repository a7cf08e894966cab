"""The in-guest agent: `python3 -m vmrun.agent.server`, started by the guest's /init.

It serves gRPC on a unix socket, bridges vsock port AGENT_PORT to it, then tells the host
it is ready by connecting to the host's ready port (which its CID names). It runs as
PID 1, so it also reaps every orphan in the guest.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import sys
import threading
import time

import vmrun
from vmrun.agent.crun import pin_crun_binary
from vmrun.agent.dns_relay import DnsRelayGuest
from vmrun.agent.hotplug import HotplugOnliner
from vmrun.agent.processes import Reaper, Spawner
from vmrun.agent.spare_netns import SpareNetns
from vmrun.agent.warm_up import WarmUp
from vmrun.common import linux
from vmrun.common.bridge import SocketBridge
from vmrun.common.constants import AGENT_PORT, AGENT_UNIX_SOCKET, READY_MESSAGE, ready_port
from vmrun.common.deferred_imports import defer_unused_grpc_modules
from vmrun.common.dns_relay import RELAY_PORT

_HOST_CID = 2
# A lost connection request is retried after this, not after the kernel's 2 s.
_CONNECT_TIMEOUT = 0.5
_SERVER_SETUP_TIMEOUT = 5.0
# /init loads the kernel modules while the agent starts, and writes this file (the guest
# uptime then) once they are in: vsock needs them.
_MODULES_LOADED = "/run/vmrun/modules-loaded"
_MODULES_TIMEOUT = 60.0


def _log(message: str) -> None:
    print(f"vmrun-agent: {message}", file=sys.stderr, flush=True)


def _vsock_listener(port: int) -> socket.socket:
    # Binding works before the vsock transport is loaded, so a template's agent can
    # listen before its clone gets the device hot-plugged.
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(64)
    return listener


def _dial_agent() -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(AGENT_UNIX_SOCKET)
    return conn


def _wait_for_modules() -> str:
    """Wait until /init has loaded the kernel modules; the guest uptime when it had ("0"
    if it never said: the agent goes on, and what lacks a module fails by itself)."""
    deadline = time.monotonic() + _MODULES_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(_MODULES_LOADED) as marker:
                return marker.read().strip() or "0"
        except FileNotFoundError:
            time.sleep(0.005)
    _log(f"the kernel modules are not all loaded after {_MODULES_TIMEOUT:g} s: going on")
    return "0"


def _uptime() -> str:
    with open("/proc/uptime") as uptime:
        return uptime.read().split()[0]


def _boot_report(milestones: dict[str, str]) -> str:
    """Guest uptime now, when /init handed over to the agent and at the agent's milestones
    (its modules in, gRPC loaded, serving): where boot time went."""
    steps = " ".join(f"{name}={at}" for name, at in milestones.items())
    return f"uptime={_uptime()} agent_started={os.environ.get('VMRUN_INIT_DONE', '0')} {steps}"


def _local_cid() -> int:
    """The guest's vsock CID; VMADDR_CID_ANY while its device is not ready."""
    try:
        with open("/dev/vsock", "rb") as dev:
            raw = fcntl.ioctl(dev, socket.IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytes(4))
    except OSError:
        return socket.VMADDR_CID_ANY
    return int.from_bytes(raw, sys.byteorder)


def _open_first_connection() -> socket.socket:
    """The gRPC connection the host's first call will travel on, opened at once: the server
    has set it up before anyone waits for it (in a template, before it is saved, so every
    clone starts with it set up; under TCG that is thousands of translated blocks fewer).

    The server drops a connection whose client says nothing within its handshake timeout
    (120 s of guest time). Guest time stands still while a template is stored, and the host
    speaks within a second of a guest's boot or resume."""
    conn = _dial_agent()
    # The server's SETTINGS frame shows it has taken the connection on; it stays in the
    # socket for the host's client.
    select.select([conn], [], [], _SERVER_SETUP_TIMEOUT)
    return conn


def _announce_ready(bridge: SocketBridge, first_connection: socket.socket, boot_report: str) -> None:
    """Connect to the host's ready port until it answers (the device may come late), say
    READY, and keep the connection: spliced to `first_connection`, it carries the host's
    first gRPC connection, so the host's first call needs no vsock connection of its own."""
    while True:
        # Our CID names the port; and a connect made while the driver is still probing goes
        # out from CID "any", which the host drops, then hangs for the 2 s connect timeout.
        cid = _local_cid()
        if cid == socket.VMADDR_CID_ANY:
            time.sleep(0.005)
            continue
        conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            conn.settimeout(_CONNECT_TIMEOUT)
            conn.connect((_HOST_CID, ready_port(cid)))
            message = f"{vmrun.__version__} {boot_report}"
            conn.sendall(READY_MESSAGE + b" " + message.encode() + b"\n")
        except OSError:
            conn.close()
            time.sleep(0.01)
            continue
        conn.settimeout(None)
        bridge.splice(conn, first_connection)
        return


def _serve_first_calls(calls: int) -> None:
    """Serve a few concurrent calls before a template is saved: its clones then start with
    the gRPC server's worker threads running and its first-call paths already taken, and
    with pyroute2 loaded for their pods' networks."""
    import grpc

    from vmrun.agent import agent_pb2 as pb
    from vmrun.agent import agent_pb2_grpc, network

    network.preload()
    with grpc.insecure_channel(f"unix:{AGENT_UNIX_SOCKET}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        pending = [stub.Health.future(pb.Empty()) for _ in range(calls)]
        for call in pending:
            call.result(timeout=30)


def _prepared_warm_up(reaper: Reaper) -> WarmUp | None:
    warm_up = WarmUp(Spawner(reaper), _log)
    try:
        warm_up.prepare()
    except OSError as exc:
        _log(f"no warm-up container: {exc}")
        return None
    return warm_up


def main() -> None:
    milestones = {"agent_main": _uptime()}  # the interpreter up, the server's imports done
    params = linux.kernel_cmdline()
    agent_port = int(params.get("agent_port", AGENT_PORT))
    if os.getpid() != 1:
        linux.become_subreaper()
    reaper = Reaper().start()
    HotplugOnliner(_log).start()  # vCPUs and memory the host adds to fit containers
    try:
        pin_crun_binary()
    except OSError as exc:
        _log(f"crun will copy itself on every call: {exc}")

    template = params.get("template") == "1"
    warm_up = _prepared_warm_up(reaper) if params.get("warm_up") == "1" else None
    if warm_up is not None and not template:
        # A booted guest: at once, while gRPC loads (2 s under TCG), on another vCPU if any.
        warm_up.run_soon()
    # gRPC and the service load only now, so that the warm-up starts first; without the
    # modules its synchronous server never uses (half a second under TCG).
    defer_unused_grpc_modules(also=("asyncio",))  # cygrpc imports it for gRPC's asyncio API only
    from concurrent import futures

    import grpc

    from vmrun.agent import agent_pb2_grpc
    from vmrun.agent.process_streams import ProcessStreamServer
    from vmrun.agent.service import AgentService
    from vmrun.common.process_stream import PROCESS_STREAM_PORT

    milestones["grpc_loaded"] = _uptime()

    os.makedirs(os.path.dirname(AGENT_UNIX_SOCKET), exist_ok=True)
    if os.path.exists(AGENT_UNIX_SOCKET):
        os.unlink(AGENT_UNIX_SOCKET)
    spare_netns = SpareNetns()
    try:
        spare_netns.make()
    except OSError as exc:
        _log(f"no spare network namespace, crun will make each: {exc}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    service = AgentService(reaper, spare_netns)
    agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{AGENT_UNIX_SOCKET}")
    server.start()
    milestones["modules_loaded"] = _wait_for_modules()  # AF_VSOCK itself is a module
    bridge = SocketBridge(_vsock_listener(agent_port), _dial_agent, "vsock-agent").start()
    DnsRelayGuest(_vsock_listener(RELAY_PORT), _log).start()  # idle until the host asks for it
    # Each guest process's stdio, signals and exit, for the host process standing for it.
    ProcessStreamServer(_vsock_listener(PROCESS_STREAM_PORT), service, _log).start()
    if template:
        _serve_first_calls(calls=8)
        if warm_up is not None:
            # A clone's: as soon as it is resumed, while its devices are hot-plugged.
            warm_up.run_after_resume()
    first_connection = _open_first_connection()
    # A template is saved once this line is on the console; its clones get vsock later.
    _log("listening")
    milestones["serving"] = _uptime()
    _announce_ready(bridge, first_connection, _boot_report(milestones))
    _log(f"ready on vsock port {agent_port}")
    # The agent serves until the guest goes. Not server.wait_for_termination(): it wakes
    # ten times a second, which under TCG is CPU every idle pod spends.
    threading.Event().wait()


if __name__ == "__main__":
    main()
