import pytest

from vmrun.pod import PodPlacement, placement


@pytest.mark.parametrize("annotations, expected", [
    ({}, PodPlacement("c1", True)),
    ({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "c1"}, PodPlacement("c1", True)),
    ({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod9"},
     PodPlacement("pod9", False)),
    ({"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "crio-pod"},
     PodPlacement("crio-pod", False)),
    ({"io.kubernetes.cri-o.ContainerType": "sandbox", "io.kubernetes.cri-o.SandboxID": "c1"}, PodPlacement("c1", True)),
    ({"io.kubernetes.docker.type": "container", "io.kubernetes.sandbox.id": "dpod"}, PodPlacement("dpod", False)),
    ({"io.kubernetes.docker.type": "podsandbox"}, PodPlacement("c1", True)),
    # A container type without a sandbox id cannot join anything: it gets its own guest.
    ({"io.kubernetes.cri.container-type": "container"}, PodPlacement("c1", True)),
    ({"io.container.manager": "libpod"}, PodPlacement("c1", True)),
])
def test_placement(annotations, expected):
    assert placement("c1", annotations) == expected
