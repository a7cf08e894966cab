"""Taps beside a pod's veths, mirrored to them with tc (Kata's tcfilter model).

Each veth gets an ingress qdisc whose matchall filter redirects every packet to the egress
of the tap, and the tap the same towards the veth: what reaches the pod goes to the guest's
NIC, what the guest sends leaves through the veth. The taps are not persistent: each
lives while an fd of it is open (ours until QEMU holds its own), so a guest that dies
takes its taps with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable

from vmrun.errors import NetworkError
from vmrun.network.netns import run_in_netns
from vmrun.network.scan import PodInterface, scan_interfaces

log = logging.getLogger("vmrun.network")

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000  # QEMU's virtio-net then passes offloads (GSO, checksums) through
_INGRESS_PARENT = 0xFFFF0000
_ETH_P_ALL = 0x0003


@dataclass
class TapEndpoint:
    """A pod interface and the tap that carries it to the guest."""

    interface: PodInterface
    tap_name: str
    tap_index: int
    tap_fd: int  # ours: closed once QEMU has its own copy


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


def _redirect(ipr: object, source: int, target: int) -> None:
    ipr.tc("add", "ingress", source)  # type: ignore[attr-defined]
    # u32 matching every packet (not matchall, which some kernels lack), as Kata does.
    ipr.tc("add-filter", "u32", source, parent=_INGRESS_PARENT,  # type: ignore[attr-defined]
           protocol=_ETH_P_ALL, keys=["0x0/0x0+0"], target=0x10001,  # a class id u32 requires; unused
           action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target})


def _drop_ingress(ipr: object, index: int) -> None:
    # Removing the ingress qdisc removes its filters too.
    with contextlib.suppress(Exception):  # gone already (the device, or the qdisc)
        ipr.tc("del", "ingress", index)  # type: ignore[attr-defined]


_IFF_UP = 0x1


class PodNetwork:
    """The taps and tc mirrors vmrun made in one pod's namespace; `close()` removes them
    (a namespace that vanished meanwhile is no error: what was in it is gone too)."""

    def __init__(self, netns_path: str, model: str):
        self.netns_path = netns_path
        self.model = model
        self.endpoints: list[TapEndpoint] = []
        self._taps_made = 0

    def add_new(self, only_up: bool = False) -> list[TapEndpoint]:
        """Endpoints for the veths that have none yet (CNI may add interfaces later), with
        `only_up` those set up (one being configured is not, yet); on a failure, those made
        by this call are undone."""
        made: list[TapEndpoint] = []
        try:
            self._in_netns(lambda: self._make_endpoints(made, only_up))
        except BaseException:
            for endpoint in made:
                self.remove(endpoint)
            raise
        return made

    def remove(self, endpoint: TapEndpoint) -> None:
        """Undo one endpoint: its mirrors, and our fd of its tap."""
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
        if self.model == "tcfilter":
            try:
                self._in_netns(lambda: self._remove_mirrors([endpoint]))
            except NetworkError as exc:
                log.debug("pod network teardown: %s", exc)  # the namespace is gone
        self.release_tap(endpoint)

    def _in_netns(self, function: Callable[[], object]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            run_in_netns(self.netns_path, function)
        except NetlinkError as exc:
            raise NetworkError(f"pod network in {self.netns_path}: netlink: "
                               f"{os.strerror(exc.code) if exc.code else exc}") from None

    def veth_indexes(self) -> set[int]:
        """The indexes of the veths in the namespace now (none if it is gone)."""
        from pyroute2 import IPRoute

        found: set[int] = set()

        def scan() -> None:
            with IPRoute() as ipr:
                found.update(interface.index for interface in scan_interfaces(ipr))

        try:
            self._in_netns(scan)
        except NetworkError as exc:
            log.debug("pod network scan: %s", exc)
        return found

    def _make_endpoints(self, made: list[TapEndpoint], only_up: bool = False) -> None:
        from pyroute2 import IPRoute

        attached = {endpoint.interface.index for endpoint in self.endpoints}
        with IPRoute() as ipr:
            up = {link["index"] for link in ipr.get_links() if link["flags"] & _IFF_UP} if only_up else set()
            for interface in scan_interfaces(ipr):
                if interface.index in attached or (only_up and interface.index not in up):
                    continue
                name = f"tap{self._taps_made}_vmrun"
                self._taps_made += 1
                try:
                    fd = _open_tap(name)
                except OSError as exc:
                    raise NetworkError(f"cannot make tap {name} for {interface.name}: {exc.strerror}") from None
                endpoint = TapEndpoint(interface, name, ipr.link_lookup(ifname=name)[0], fd)
                self.endpoints.append(endpoint)
                made.append(endpoint)
                ipr.link("set", index=endpoint.tap_index, mtu=interface.mtu, state="up")
                if self.model == "tcfilter":
                    _redirect(ipr, interface.index, endpoint.tap_index)
                    _redirect(ipr, endpoint.tap_index, interface.index)
                log.debug("pod interface %s (%s) -> %s", interface.name, interface.mac, name)

    def release_tap(self, endpoint: TapEndpoint) -> None:
        """Close our fd of the tap (QEMU holds its own now)."""
        if endpoint.tap_fd >= 0:
            os.close(endpoint.tap_fd)
            endpoint.tap_fd = -1

    def close(self) -> None:
        endpoints, self.endpoints = self.endpoints, []
        if self.model == "tcfilter" and endpoints:
            try:
                self._in_netns(lambda: self._remove_mirrors(endpoints))
            except NetworkError as exc:
                log.debug("pod network teardown: %s", exc)  # the namespace is gone
        for endpoint in endpoints:
            self.release_tap(endpoint)

    @staticmethod
    def _remove_mirrors(endpoints: list[TapEndpoint]) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for endpoint in endpoints:
                _drop_ingress(ipr, endpoint.interface.index)
                _drop_ingress(ipr, endpoint.tap_index)
