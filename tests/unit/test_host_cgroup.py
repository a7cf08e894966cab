"""Which host cgroup a spec names, and where the hierarchies are."""

from __future__ import annotations

import os

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


@pytest.fixture
def fake_systemd(tmp_path, monkeypatch):
    """systemd "running" (its runtime directory) and a busctl that records its calls; one
    that says a unit exists when asked to start it again."""
    import vmrun.host_cgroup as host_cgroup

    runtime = tmp_path / "systemd-system"
    runtime.mkdir()
    monkeypatch.setattr(host_cgroup, "_SYSTEMD_RUNTIME", runtime)
    monkeypatch.setattr(host_cgroup.HostCgroup, "_holds", lambda self, pid: True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "busctl").write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$*" in *StartTransientUnit*) if [ -e {tmp_path}/started ]; then
  echo "Call failed: Unit vmrun-pod.scope already exists." >&2; exit 1; fi; touch {tmp_path}/started;; esac
""")
    (bin_dir / "busctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_a_systemd_scope_is_made_through_systemd_where_it_runs(fake_systemd):
    from vmrun.host_cgroup import HostCgroup, cgroup_path

    path = cgroup_path({"linux": {"cgroupsPath": "kubepods-pod1.slice:vmrun:pod"}})
    cgroup = HostCgroup(path)
    assert cgroup.systemd_scope == ("kubepods-pod1.slice", "vmrun-pod.scope")
    cgroup.join([4242])
    cgroup.join([4343, 4344])  # the unit exists: the processes are attached to it
    cgroup.remove()  # systemd removes an empty scope itself: no call
    assert fake_systemd.read_text().splitlines() == [
        "call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager "
        "StartTransientUnit ssa(sv)a(sa(sv)) vmrun-pod.scope replace 4 Slice s kubepods-pod1.slice "
        "Delegate b true DefaultDependencies b false PIDs au 1 4242 0",
        "call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager "
        "StartTransientUnit ssa(sv)a(sa(sv)) vmrun-pod.scope replace 4 Slice s kubepods-pod1.slice "
        "Delegate b true DefaultDependencies b false PIDs au 2 4343 4344 0",
        "call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager "
        "AttachProcessesToUnit ssau vmrun-pod.scope  2 4343 4344",
    ]


def test_without_systemd_a_scope_path_is_written_directly(tmp_path, monkeypatch):
    import vmrun.host_cgroup as host_cgroup

    monkeypatch.setattr(host_cgroup, "_SYSTEMD_RUNTIME", tmp_path / "absent")
    assert host_cgroup.HostCgroup("/system.slice/vmrun-pod.scope").systemd_scope is None
