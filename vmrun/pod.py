"""Which guest a container belongs to, from the annotations its caller put in the spec.

containerd's CRI plugin, CRI-O and dockershim each mark a pod's sandbox (pause) container
and name the sandbox of every other container. A container without such annotations is
a pod of its own: it gets its own guest, as runc users expect.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmrun.errors import InvalidIdError
from vmrun.oci import validate_id

# (container-type key, sandbox value, sandbox-id key) for each caller.
_CALLERS = (
    ("io.kubernetes.cri.container-type", "sandbox", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "sandbox", "io.kubernetes.cri-o.SandboxID"),
    ("io.kubernetes.docker.type", "podsandbox", "io.kubernetes.sandbox.id"),
)


@dataclass(frozen=True)
class PodPlacement:
    sandbox_id: str  # the id of the container whose guest this one runs in
    owns_guest: bool  # True: this container's create boots the guest, its delete ends it


def placement(container_id: str, annotations: dict[str, str]) -> PodPlacement:
    for type_key, sandbox_value, sandbox_id_key in _CALLERS:
        kind = annotations.get(type_key)
        if kind is None:
            continue
        if kind == sandbox_value:
            return PodPlacement(container_id, True)
        sandbox_id = annotations.get(sandbox_id_key, "")
        if sandbox_id and sandbox_id != container_id:
            try:
                validate_id(sandbox_id)
            except InvalidIdError:
                raise InvalidIdError(f"annotation {sandbox_id_key}: invalid sandbox id {sandbox_id!r}") from None
            return PodPlacement(sandbox_id, False)
    return PodPlacement(container_id, True)
