"""Which host cgroup a spec names, and where the hierarchies are."""

from __future__ import annotations

import pytest

from vmrun.errors import VmrunError
from vmrun.host_cgroup import cgroup_path, hierarchies


def spec(path):
    return {"linux": {"cgroupsPath": path}}


@pytest.mark.parametrize("given, expected", [
    ("/kubepods/besteffort/pod12/abc", "/kubepods/besteffort/pod12/abc"),
    ("k8s.io/abc", "/k8s.io/abc"),
    ("//a/./b/", "/a/b"),
    ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
    ("machine.slice:libpod:abc", "/machine.slice/libpod-abc.scope"),
    ("kubepods-besteffort-pod12.slice:cri-containerd:abc",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"),
    (":vmrun:abc", "/system.slice/vmrun-abc.scope"),
    ("user.slice::abc", "/user.slice/abc.scope"),
])
def test_cgroupfs_and_systemd_paths(given, expected):
    assert cgroup_path(spec(given)) == expected


def test_no_path_is_no_cgroup():
    assert cgroup_path({}) == "" and cgroup_path(spec("")) == ""


@pytest.mark.parametrize("bad", ["/a/../../etc", "a-.slice:x:y", "not-a-slice:x:y", 42])
def test_paths_that_could_escape_or_mean_nothing_are_refused(bad):
    with pytest.raises(VmrunError):
        cgroup_path(spec(bad))


def test_hierarchies_from_mountinfo():
    mountinfo = "\n".join([
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "30 29 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
        "31 29 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
        "32 29 0:28 /sub /mnt/cg rw,relatime - cgroup cgroup rw,memory",  # a bind of a subtree
        "33 29 0:29 / /run/vm/x/shared/c/rootfs/sys/fs/cgroup rw - cgroup2 cgroup2 rw",  # not the host's
    ])
    assert [str(p) for p in hierarchies(mountinfo)] == ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/unified"]
