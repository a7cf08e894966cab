"""The guest's side of pod networking: the hot-plugged NICs take the pod's names,
addresses, routes and neighbours (pyroute2, imported only when a pod has a network)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from typing import Iterator

from vmrun.agent import agent_pb2 as pb
from vmrun.common.deferred_imports import bare_package, defer, load

_NIC_TIMEOUT = 30.0
_NUD_PERMANENT = 0x80


class NetworkConfigError(Exception):
    """A request the guest cannot carry out (no such NIC, a bad address)."""


def _pyroute2():  # type: ignore[no-untyped-def]
    """pyroute2's IPRoute and NetlinkError, without the rest of pyroute2 (deferred_imports.py).

    The guest has no ssl module (no TLS in it). asyncio, which pyroute2 runs on, copes with
    that if it finds none; pyroute2's probe module imports ssl for a probe we never send,
    so it gets a stand-in, put in place only once asyncio has looked for itself."""
    load("asyncio")
    defer("ssl")
    bare_package("pyroute2")
    from pyroute2.iproute import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    return IPRoute, NetlinkError


@contextlib.contextmanager
def _iproute() -> Iterator:  # type: ignore[type-arg]
    """An IPRoute; a netlink error becomes a NetworkConfigError with the kernel's reason."""
    IPRoute, NetlinkError = _pyroute2()

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise NetworkConfigError(f"netlink: {os.strerror(exc.code) if exc.code else exc}") from None


def preload() -> None:
    """Import pyroute2 and open a netlink socket once: seconds under TCG, which a template
    spends so that its clones' pods get their network without that wait."""
    with _iproute() as ipr:
        ipr.get_links()


def _index_by_mac(ipr, mac: str) -> int | None:  # type: ignore[no-untyped-def]
    for link in ipr.get_links():
        if (link.get_attr("IFLA_ADDRESS") or "").lower() == mac.lower():
            return int(link["index"])
    return None


def _index_by_name(ipr, name: str) -> int:  # type: ignore[no-untyped-def]
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkConfigError(f"no network device {name!r} in the guest")
    return int(found[0])


def _wait_for_nic(ipr, mac: str, timeout: float = _NIC_TIMEOUT) -> int:  # type: ignore[no-untyped-def]
    """The index of the NIC with `mac`: a hot-plugged one may still be probing."""
    deadline = time.monotonic() + timeout
    while (index := _index_by_mac(ipr, mac)) is None:
        if time.monotonic() > deadline:
            raise NetworkConfigError(f"no network device with MAC {mac} appeared in the guest")
        time.sleep(0.01)
    return index


def _describe(ipr, index: int) -> pb.Interface:  # type: ignore[no-untyped-def]
    link = ipr.get_links(index)[0]
    addresses = [pb.IPAddress(address=a.get_attr("IFA_ADDRESS"), prefix_length=a["prefixlen"])
                 for a in ipr.get_addr(index=index)]
    return pb.Interface(name=link.get_attr("IFLA_IFNAME"), mac=link.get_attr("IFLA_ADDRESS"),
                        mtu=link.get_attr("IFLA_MTU"), addresses=addresses)


def update_interface(interface: pb.Interface) -> pb.Interface:
    """Configure the NIC with `interface.mac` (or named `interface.device`) as asked."""
    with _iproute() as ipr:
        index = _index_by_name(ipr, interface.device) if interface.device else _wait_for_nic(ipr, interface.mac)
        link = ipr.get_links(index)[0]
        ipr.link("set", index=index, state="down")
        if interface.name and interface.name != link.get_attr("IFLA_IFNAME"):
            if ipr.link_lookup(ifname=interface.name):
                raise NetworkConfigError(f"the guest already has a device named {interface.name!r}")
            ipr.link("set", index=index, ifname=interface.name)
        if interface.mtu:
            ipr.link("set", index=index, mtu=interface.mtu)
        for address in interface.addresses:
            try:
                ipaddress.ip_address(address.address)
            except ValueError:
                raise NetworkConfigError(f"bad address {address.address!r}") from None
            ipr.addr("replace", index=index, address=address.address, prefixlen=address.prefix_length)
        ipr.link("set", index=index, state="up")
        return _describe(ipr, index)


def remove_interface(mac: str) -> None:
    """Take the NIC down and its addresses off, before the host unplugs it."""
    with _iproute() as ipr:
        index = _index_by_mac(ipr, mac)
        if index is None:
            return  # gone already
        ipr.flush_addr(index=index)
        ipr.link("set", index=index, state="down")


def _route_arguments(ipr, route: pb.Route) -> dict:  # type: ignore[no-untyped-def]
    arguments: dict = {"scope": route.scope}
    if route.destination:
        network = ipaddress.ip_network(route.destination, strict=False)
        arguments.update(dst=str(network.network_address), dst_len=network.prefixlen,
                         family=socket.AF_INET6 if network.version == 6 else socket.AF_INET)
    else:
        version = ipaddress.ip_address(route.gateway).version if route.gateway else 4
        arguments.update(dst_len=0, family=socket.AF_INET6 if version == 6 else socket.AF_INET)
    if route.gateway:
        arguments["gateway"] = route.gateway
    if route.device:
        arguments["oif"] = _index_by_name(ipr, route.device)
    if route.source:
        arguments["prefsrc"] = route.source
    return arguments


def update_routes(routes: pb.Routes) -> pb.Routes:
    """Add (or replace) the routes, on-link ones first so gateways are reachable."""
    ordered = sorted(routes.routes, key=lambda route: bool(route.gateway))
    with _iproute() as ipr:
        for route in ordered:
            try:
                ipr.route("replace", **_route_arguments(ipr, route))
            except ValueError as exc:
                raise NetworkConfigError(f"bad route {route.destination or 'default'}: {exc}") from None
        return _routes(ipr)


def add_neighbors(neighbors: list[pb.Neighbor]) -> None:
    with _iproute() as ipr:
        for neighbor in neighbors:
            ipr.neigh("replace", dst=neighbor.address, lladdr=neighbor.mac,
                      ifindex=_index_by_name(ipr, neighbor.device), state=_NUD_PERMANENT)


def list_interfaces() -> pb.Interfaces:
    with _iproute() as ipr:
        return pb.Interfaces(interfaces=[_describe(ipr, link["index"]) for link in ipr.get_links()])


def list_routes() -> pb.Routes:
    with _iproute() as ipr:
        return _routes(ipr)


def _routes(ipr) -> pb.Routes:  # type: ignore[no-untyped-def]
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    result = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=254):
            destination = route.get_attr("RTA_DST")
            result.append(pb.Route(
                destination=f"{destination}/{route['dst_len']}" if destination else "",
                gateway=route.get_attr("RTA_GATEWAY") or "",
                device=names.get(route.get_attr("RTA_OIF"), ""),
                source=route.get_attr("RTA_PREFSRC") or "",
                scope=route["scope"]))
    return pb.Routes(routes=result)
