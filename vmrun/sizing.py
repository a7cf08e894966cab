"""The guest's size from the spec: memory and vCPUs for the limits of its containers.

Placeholder while the sizing work lands (issue 15): the guest keeps its template's size.
"""

from __future__ import annotations

from pathlib import Path


def fit_guest_to(vm_dir: Path, container_id: str, resources: dict) -> None:
    """Grow the guest at `vm_dir` so that `resources` (linux.resources of container
    `container_id`, or an update of them) fit, beside its other containers."""
