"""What CNI left in a pod's network namespace: its veths, their addresses, routes and
neighbours, as the guest must reproduce them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

_MAIN_TABLE = 254
_PROTO_KERNEL = 2  # routes the kernel made for an address: the guest's kernel makes its own
_NUD_PERMANENT = 0x80


@dataclass(frozen=True)
class IPAddress:
    address: str
    prefix_len: int


@dataclass(frozen=True)
class Route:
    destination: str  # "" for a default route
    prefix_len: int
    gateway: str = ""
    scope: int = 0


@dataclass(frozen=True)
class Neighbor:
    address: str
    mac: str


@dataclass
class PodInterface:
    """A veth of the pod's namespace, as the guest's NIC is to look."""

    name: str
    index: int
    mac: str
    mtu: int
    addresses: list[IPAddress] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbors: list[Neighbor] = field(default_factory=list)


def _link_kind(link: object) -> str:
    info = link.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    return (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _is_link_local(address: str) -> bool:
    return ipaddress.ip_address(address).is_link_local


def scan_interfaces(ipr: object) -> list[PodInterface]:
    """The veths of the namespace `ipr` (a pyroute2 IPRoute) speaks to, with what they carry."""
    interfaces = []
    for link in ipr.get_links():  # type: ignore[attr-defined]
        if _link_kind(link) != "veth":
            continue
        index = link["index"]
        interface = PodInterface(name=link.get_attr("IFLA_IFNAME"), index=index,
                                 mac=link.get_attr("IFLA_ADDRESS"), mtu=link.get_attr("IFLA_MTU"))
        for addr in ipr.get_addr(index=index):  # type: ignore[attr-defined]
            address = addr.get_attr("IFA_ADDRESS")
            if address and not _is_link_local(address):  # the guest makes its own fe80::
                interface.addresses.append(IPAddress(address, addr["prefixlen"]))
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family):  # type: ignore[attr-defined]
                if route.get_attr("RTA_OIF") != index or route["proto"] == _PROTO_KERNEL:
                    continue
                if (route.get_attr("RTA_TABLE") or route["table"]) != _MAIN_TABLE:
                    continue
                destination = route.get_attr("RTA_DST") or ""
                if destination and (_is_link_local(destination) or ipaddress.ip_address(destination).is_multicast):
                    continue
                interface.routes.append(Route(destination, route["dst_len"], route.get_attr("RTA_GATEWAY") or "",
                                              route["scope"]))
        for neighbor in ipr.get_neighbours(ifindex=index):  # type: ignore[attr-defined]
            # Only what someone pinned (a CNI plugin's static ARP entry); the rest is learnt.
            if neighbor["state"] & _NUD_PERMANENT and neighbor.get_attr("NDA_LLADDR"):
                interface.neighbors.append(Neighbor(neighbor.get_attr("NDA_DST"), neighbor.get_attr("NDA_LLADDR")))
        interfaces.append(interface)
    return interfaces
