"""A sandbox: one guest (QEMU + virtiofsd + vsock + the agent) holding a pod's containers.

Everything a sandbox starts or mounts is registered on an ExitStack as it happens, so
`close()` undoes exactly what was done, in reverse, whatever step failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vmrun.bootfiles import BootFiles, boot_files
from vmrun.common.bridge import SocketBridge, first_then, read_line
from vmrun.common.constants import AGENT_PORT, READY_MESSAGE, SHARED_FS_TAG, agent_kernel_params, ready_port
from vmrun.common.files import write_json_atomic
from vmrun.config import Config
from vmrun.control import CONTROL_SOCKET, ControlServer
from vmrun.errors import HypervisorError, Interrupted, NetworkError, VmrunError
from vmrun.helper_watch import AgentKeepalive, ConsoleWatch, HelperWatch
from vmrun.kept_logs import keep_logs
from vmrun.log import debugging
from vmrun.hypervisor.accel import Acceleration, detect_acceleration
from vmrun.hypervisor.memory_copy import MemoryCopy
from vmrun.hypervisor.qemu import QemuVM, VMSpec, base_kernel_params, hotplug_port_id
from vmrun.hypervisor.resize import DEFAULT_MAX_MEMORY_MIB, DEFAULT_MAX_VCPUS, GuestCounts, GuestSizer
from vmrun.hypervisor.templates import restore_state, template_vm_spec
from vmrun.hypervisor.virtiofsd import VIRTIOFSD_SOCKET, Virtiofsd, find_virtiofsd
from vmrun.hypervisor.vsock.base import VsockTransport
from vmrun.hypervisor.vsock.dial import record_address
from vmrun.hypervisor.vsock.transports import make_transport
from vmrun.mounts import remove_tree_safely
from vmrun.network.attachment import NetworkAttachment
from vmrun.network.dns_relay import DnsRelayHost
from vmrun.network.netns import check_netns
from vmrun.network.watch import NetnsWatcher
from vmrun.oci import Bundle
from vmrun.share import SHARED, make_share, remove_share, share_container_files, unshare_container_files
from vmrun.templating import TemplateLease, lease_template
from vmrun.threads import InThread

if TYPE_CHECKING:
    from vmrun.agent.client import AgentClient

log = logging.getLogger("vmrun.sandbox")

# Spare PCIe root ports of a booted guest, for NICs hot-plugged into it (a clone has its
# template's).
COLD_BOOT_HOTPLUG_PORTS = 4
# What `vmrun monitor` reads of a running sandbox, in its directory (vmrun/monitor.py).
SANDBOX_RECORD = "sandbox.json"

def daemon_log_for(vm_dir: Path) -> Path:
    """The log of the sandbox daemon holding the guest at `vm_dir`: not in it (it is
    written before the directory exists and after it is gone), in `daemon-logs/` beside
    the guests' directories."""
    return vm_dir.parent.with_name("daemon-logs") / f"{vm_dir.name}.log"


def vm_dir_for(config: Config, sandbox_id: str) -> Path:
    # Hashed and short: unix socket paths must fit in 108 bytes. The run dir is part of the
    # hash: sandboxes of two configurations never share a name.
    key = f"{config.run_dir}\0{sandbox_id}".encode()
    return config.vm_dir / hashlib.sha256(key).hexdigest()[:16]


def accept_greeting(listener: socket.socket, check_guest: Callable[[], None],
                    is_guest: Callable[[object], bool] = lambda peer: True) -> tuple[socket.socket, bytes]:
    """The next connection on `listener` from our guest (`is_guest` of its peer address)
    that says something, and its first line.

    A connection closed (or silent for 5 s) before its first byte is one the agent gave up
    on: under load its connect can time out in the guest after the host has accepted it,
    and the agent dials again. `check_guest` raises when there is no point in waiting any
    longer."""
    listener.settimeout(0.05)
    while True:
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            check_guest()
            continue
        if not is_guest(peer):
            log.debug("a ready connection from %s, not from our guest: closed", peer)
            conn.close()
            check_guest()
            continue
        try:
            conn.settimeout(5.0)
            greeting = read_line(conn, 256)
            conn.settimeout(None)
        except (ConnectionResetError, TimeoutError):
            greeting = b""  # dropped, or silent (the agent's reset was lost): as if closed
        except OSError:
            conn.close()
            raise
        if greeting:
            return conn, greeting
        log.debug("the agent closed a ready connection before its READY: waiting for the next")
        conn.close()
        check_guest()


@dataclass
class Sandbox:
    """One guest. Use as a context manager, or call `start()` and `close()`."""

    sandbox_id: str
    config: Config
    hostname: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    guest_timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = vm_dir_for(self.config, self.sandbox_id)
        self.shared_dir = self.dir / SHARED
        self.console_log = self.dir / "console.log"
        self.agent_socket = self.dir / "agent.sock"
        self._stack = contextlib.ExitStack()
        self._t0 = time.monotonic()
        self.vm: QemuVM | None = None
        self.agent: AgentClient | None = None
        self._nic_ports: list[str] = []
        self.network: NetworkAttachment | None = None
        self._network_lock = threading.Lock()
        self.sizer: GuestSizer | None = None
        self._transport: VsockTransport | None = None
        self._dns_relay: DnsRelayHost | None = None
        self._netns_watcher: NetnsWatcher | None = None
        self.helper_death = ""  # the helper whose death ended the guest, if one did
        self._record_lock = threading.Lock()  # fit requests come on threads of their own
        self._memory_mib = 0

    def _mark(self, phase: str) -> None:
        self.timings[phase] = time.monotonic() - self._t0

    def start(self) -> "Sandbox":
        try:
            self._boot()
        except BaseException as exc:
            # Kept before close() removes them, for a failure (not a caller's interruption).
            kept = (keep_logs(self.dir, self.config.run_dir / "failed", self.sandbox_id,
                              extra=[daemon_log_for(self.dir)])
                    if isinstance(exc, VmrunError) and not isinstance(exc, Interrupted) and self.dir.is_dir()
                    else None)
            self.close()
            if kept is not None:
                exc.args = (f"{exc} (the sandbox's logs: {kept})", *exc.args[1:])
            raise
        return self

    def _boot(self) -> None:
        files = boot_files(self.config)
        if self.dir.exists():
            raise HypervisorError(f"sandbox directory {self.dir} already exists")
        self.dir.mkdir(parents=True, mode=0o700)
        self._stack.callback(remove_tree_safely, self.dir)
        make_share(self.dir)
        self._stack.callback(remove_share, self.dir)
        acceleration = detect_acceleration(self.config.acceleration, self.config.run_dir)
        lease = lease_template(self.config, files, acceleration)
        if lease is not None:
            self._stack.callback(lease.release)
        # A clone's RAM copy and its QEMU start first: QEMU needs no helper before its devices
        # are hot-plugged, and initialises while the helpers start and the RAM is copied.
        clone = self._start_clone(lease, files, acceleration) if lease is not None else None

        # A booting QEMU connects to the helpers at once, so it waits for them.
        virtiofsd = Virtiofsd(find_virtiofsd(self.config.virtiofsd), self.dir / VIRTIOFSD_SOCKET,
                              self.shared_dir, self.dir / "virtiofsd.log")
        self._stack.push(virtiofsd)
        virtiofsd.launch()
        cid = 3 + int(self.dir.name[:7], 16)  # < 2**28, unique enough per host for kernel vsock
        transport = self._transport = make_transport(self.dir, cid)
        self._stack.push(transport)
        transport.launch()
        record_address(self.dir, transport.address)  # for the pod's shims (process streams)
        # Its own ready port, by its CID: with kernel vsock, host ports are shared by all guests.
        ready_listener = transport.listen(ready_port(cid))
        self._stack.callback(ready_listener.close)
        # gRPC and protobuf take ~60 ms to import, and a first channel ~20 ms to make; they
        # are needed only once the guest is ready: made meanwhile, while this thread mostly
        # waits on QEMU and helpers. Not earlier: imports hold the GIL for long stretches,
        # and the launches above would wait for it. The channel connects at its first call.
        agent_client = InThread(self._make_agent_client, "agent-client")

        def wait_for_helpers() -> None:
            virtiofsd.wait_started()
            transport.wait_started()
            self._mark("helpers_started")

        devices = [virtiofsd.device(SHARED_FS_TAG), transport.device()]
        if lease is not None and clone is not None:
            self.vm = self._restore_clone(lease, *clone)
            wait_for_helpers()
            for index, device in enumerate(devices):
                device.hotplug(self.vm, hotplug_port_id(index))
            self.vm.resume()
        else:
            wait_for_helpers()
            translated = acceleration.translates
            params = f"{base_kernel_params(translated)} {agent_kernel_params(translated, self.config.vcpus)}"
            spec = VMSpec(
                name=f"vmrun-{self.sandbox_id[:32]}",
                qemu=self.config.qemu,
                acceleration=acceleration,
                vcpus=self.config.vcpus,
                memory_mib=self.config.memory_mib,
                kernel=files.kernel,
                initrd=files.initrd,
                root_image=files.root,
                kernel_params=f"{params} {self.config.kernel_params}".strip(),
                console_log=self.console_log,
                device_args=[arg for device in devices for arg in device.command_line()],
                hotplug_ports=COLD_BOOT_HOTPLUG_PORTS,
                max_vcpus=max(DEFAULT_MAX_VCPUS, self.config.vcpus),
                max_memory_mib=max(DEFAULT_MAX_MEMORY_MIB, self.config.memory_mib),
            )
            log.debug("booting %s with %s (%s)", self.sandbox_id, acceleration.name, acceleration.reason)
            self.vm = QemuVM(spec, self.dir / "qmp.sock", self.dir / "qemu.log",
                             console_watch=ConsoleWatch(self._helper_died)).start()
            self._stack.callback(self.vm.close)
        # NICs are hot-plugged on the ports a clone's own devices leave free.
        first_free = len(devices) if lease is not None else 0
        self._nic_ports = [hotplug_port_id(i) for i in range(first_free, self.vm.spec.hotplug_ports)]
        self._mark("qemu_started")

        ready_connection = self._wait_ready(ready_listener, transport.is_guest)
        ready_listener.close()  # one READY per guest: nobody may say it again
        self._stack.callback(ready_connection.close)
        self._mark("agent_ready")

        host_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host_side.bind(str(self.agent_socket))
        host_side.listen(16)
        # The guest's READY connection carries the first gRPC connection: no vsock connect.
        dial = first_then(ready_connection, lambda: transport.connect(AGENT_PORT))
        bridge = SocketBridge(host_side, dial, "agent-bridge").start()
        self._stack.callback(bridge.close)
        self.agent = agent_client.result()  # made in the background, above
        self._stack.callback(self.agent.close)
        self.kernel_release = self.agent.create_sandbox(self.sandbox_id, self.hostname, SHARED_FS_TAG,
                                                        debug=debugging())
        self.sizer = GuestSizer(self.vm, self._guest_counts, self.config.boot_timeout)
        control = ControlServer(self.dir / CONTROL_SOCKET, {
            # Grow the guest for a container's limits (vmrun/sizing.py: fit_guest_to).
            "fit": lambda request: self.fit(str(request.get("container_id", "")), request.get("resources") or {}),
            "unfit": lambda request: self.sizer.forget(str(request.get("container_id", ""))) if self.sizer else None,
            "network-add": lambda request: self.attach_network(str(request.get("netns", "")),
                                                               watch=bool(request.get("watch"))),
            "network-rm": lambda request: self._network_or_fail().remove(str(request.get("name", ""))),
            "network-ls": lambda request: self.network.interfaces() if self.network else [],
            "dns-relay": lambda request: self.relay_dns(str(request.get("netns", "")),
                                                        [str(a) for a in request.get("addresses", [])]),
        })
        self._stack.callback(control.close)
        vm = self.vm

        def signal_helpers_to_stop() -> None:
            # At teardown QEMU and the helpers are all told to go first, then reaped one by
            # one: each exit (unmapping the guest's RAM) overlaps the others.
            for helper in (vm, virtiofsd, transport):
                helper.signal_stop()

        self._stack.callback(signal_helpers_to_stop)
        # Closed first: the helpers stopped at teardown are no deaths.
        watch = HelperWatch({"virtiofsd": virtiofsd.alive, "the vsock backend": transport.alive},
                            self._helper_died)
        self._stack.callback(watch.close)
        keepalive = AgentKeepalive(self.agent.health, self._helper_died)
        self._stack.callback(keepalive.close)
        self._mark("sandbox_created")
        self._write_record(self.vm.spec.memory_mib)

    @property
    def vsock_address(self) -> str:
        """How host processes reach the guest's ports (vmrun/hypervisor/vsock/dial.py)."""
        if self._transport is None:
            raise HypervisorError("the sandbox is not running")
        return self._transport.address

    def _write_record(self, memory_mib: int) -> None:
        """Record the id (the directory's name is a hash of it), the boot timings and the
        guest's RAM for `vmrun monitor`: QEMU's QMP socket takes no second client. The
        guest never shrinks: the largest size wins."""
        with self._record_lock:
            self._memory_mib = max(self._memory_mib, memory_mib)
            record = {"sandbox_id": self.sandbox_id, "timings": self.timings, "memory_mib": self._memory_mib}
            try:
                write_json_atomic(self.dir / SANDBOX_RECORD, record, mode=0o600)
            except OSError as exc:  # monitoring only: never worth failing the pod for
                log.warning("cannot write %s: %s", self.dir / SANDBOX_RECORD, exc)

    def _helper_died(self, name: str) -> None:
        if self.helper_death:
            return
        kept = keep_logs(self.dir, self.config.run_dir / "failed", self.sandbox_id, extra=[daemon_log_for(self.dir)])
        self.helper_death = f"{name} failed" + (f" (the sandbox's logs: {kept})" if kept else "")
        log.warning("%s: the guest goes", self.helper_death)
        if self.vm is not None:
            self.vm.signal_stop()  # SIGKILL: its death ends the sandbox (the daemon's loop, run's relay)

    def fit(self, container_id: str, resources: dict) -> dict:
        """Grow the guest so that container `container_id`'s `resources` fit beside the
        others'; its size, and a warning for each part capped."""
        if self.sizer is None:
            raise HypervisorError("the sandbox is not running")
        if not isinstance(resources, dict):
            raise HypervisorError("fit: resources must be an object")
        size = self.sizer.fit(container_id, resources)
        self._write_record(int(size["memory_mib"]))
        return size

    def _guest_counts(self) -> GuestCounts:
        assert self.agent is not None
        details = self.agent.guest_details()
        return GuestCounts(vcpus=details.cpus, memory_bytes=details.memory_bytes)

    def _make_agent_client(self) -> "AgentClient":
        from vmrun.agent.client import AgentClient

        return AgentClient(str(self.agent_socket))

    def _start_clone(self, lease: TemplateLease, files: BootFiles,
                     acceleration: Acceleration) -> tuple[MemoryCopy, QemuVM]:
        """Start copying the template's RAM into the clone's own memory (sparse), and
        start QEMU to restore into it: QEMU touches guest RAM only when the state loads.

        A private copy: vhost-user backends need the clone's RAM shared, and the guest's
        writes must reach neither the template nor a sibling clone. In a memfd: no name
        anyone could take first or read, and it is freed with the last process holding it,
        however they end.
        """
        memory = os.memfd_create(f"vmrun-clone-{self.dir.name}", os.MFD_CLOEXEC)
        self._stack.callback(os.close, memory)
        memory_copy = self._stack.enter_context(MemoryCopy(lease.template.memory, memory))
        spec = template_vm_spec(lease.definition, qemu=self.config.qemu, acceleration=acceleration,
                                files=files, console_log=self.console_log, memory_fd=memory, incoming=True)
        vm = QemuVM(spec, self.dir / "qmp.sock", self.dir / "qemu.log",
                    console_watch=ConsoleWatch(self._helper_died)).launch()
        self._stack.callback(vm.close)
        return memory_copy, vm

    def _restore_clone(self, lease: TemplateLease, memory_copy: MemoryCopy, vm: QemuVM) -> QemuVM:
        """Restore the template's state, once QEMU is up and the RAM copied; the clone stays
        paused."""
        vm.wait_started()
        memory_copy.wait(60)
        with open(lease.template.state, "rb") as state:
            lease.release()  # RAM copied and state file open: the template may be replaced now
            restore_state(vm, state.fileno())
        self._mark("clone_restored")
        log.debug("cloned %s from template %s", self.sandbox_id, lease.definition.name)
        return vm

    def _wait_ready(self, listener: socket.socket, is_guest: Callable[[object], bool]) -> socket.socket:
        """The guest agent's READY connection, once it has said so."""
        assert self.vm is not None
        vm = self.vm
        deadline = time.monotonic() + self.config.boot_timeout

        def check_guest() -> None:
            if not vm.alive():
                raise HypervisorError(vm.with_console(vm.failure()))
            if time.monotonic() > deadline:
                timeout = self.config.boot_timeout
                raise HypervisorError(vm.with_console(f"the guest agent was not ready within {timeout:g}s"))

        conn, greeting = accept_greeting(listener, check_guest, is_guest)
        if not greeting.startswith(READY_MESSAGE):
            conn.close()
            raise HypervisorError(f"unexpected greeting from the guest agent: {greeting[:40]!r}")
        # "READY <version> uptime=S agent_started=S <milestone>=S...": the guest's own view
        # of its boot (vmrun/agent/server.py), kept as numbers only.
        for word in greeting.decode(errors="replace").split()[2:]:
            key, _, value = word.partition("=")
            try:
                self.guest_timings[key] = float(value)
            except ValueError:
                continue
        return conn

    def attach_network(self, netns_path: str, watch: bool = False) -> list[str]:
        """Carry the interfaces of the pod's network namespace into the guest (hot-plugged
        NICs), until close; again later, those CNI added since. The guest's new names.
        With `watch` (a namespace vmrun made, which dockerd changes while the container
        runs), interfaces that come or go later follow by themselves (network/watch.py)."""
        assert self.vm is not None and self.agent is not None
        with self._network_lock:  # the control socket serves requests concurrently
            if self.network is None:
                check_netns(netns_path)  # a typo must not become the pod's network for good
                self.network = NetworkAttachment(self.vm, self.agent, netns_path, self.config.network_model,
                                                 self._nic_ports)
                self._stack.callback(self.network.close)
            elif self.network.netns_path != netns_path:
                raise NetworkError(f"the pod's network is {self.network.netns_path}, not {netns_path}")
            network = self.network
            if watch and self._netns_watcher is None:
                self._netns_watcher = NetnsWatcher(netns_path, network.sync)
                self._stack.callback(self._netns_watcher.close)  # before the network's close
        return network.add_new()

    def relay_dns(self, netns_path: str, addresses: list[str]) -> None:
        """Answer DNS at `addresses` in the guest by asking them in the container's host
        namespace `netns_path` (network/dns_relay.py), until close."""
        assert self._transport is not None
        with self._network_lock:
            if self._dns_relay is not None:
                return  # the pod's name servers are its first container's
            self._dns_relay = DnsRelayHost(self._transport, netns_path, addresses)
            self._stack.callback(self._dns_relay.close)

    def _network_or_fail(self) -> NetworkAttachment:
        if self.network is None:
            raise NetworkError("the sandbox has no pod network")
        return self.network

    def share_container(self, container_id: str, bundle: Bundle) -> None:
        """Share the container's files with the guest until the sandbox closes."""
        self._stack.callback(unshare_container_files, self.shared_dir, container_id)
        share_container_files(self.shared_dir, container_id, bundle)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
