import json

import pytest

from vmrun.common.constants import SHARED_DIR
from vmrun.errors import BundleError, InvalidIdError
from vmrun.oci import default_spec, guest_process, guest_spec, load_bundle, validate_id, write_default_spec


def write_bundle(tmp_path, spec, make_rootfs=True):
    if make_rootfs:
        (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(spec) if not isinstance(spec, str) else spec)
    return tmp_path


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "x/..", "a b", "é", "x" * 256])
def test_invalid_ids_are_refused(bad):
    with pytest.raises(InvalidIdError):
        validate_id(bad)


@pytest.mark.parametrize("good", ["a", "abc-1.2_3+4", "0" * 64, "..a"])
def test_valid_ids_pass(good):
    assert validate_id(good) == good


def test_load_bundle_resolves_relative_rootfs(tmp_path):
    bundle = load_bundle(write_bundle(tmp_path, default_spec()))
    assert bundle.rootfs == tmp_path / "rootfs"
    assert bundle.terminal is True


def test_absolute_rootfs_as_podman_gives_it(tmp_path):
    rootfs = tmp_path / "elsewhere"
    rootfs.mkdir()
    spec = default_spec()
    spec["root"]["path"] = str(rootfs)
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    assert load_bundle(write_bundle(bundle_dir, spec, make_rootfs=False)).rootfs == rootfs


def test_unparsable_config_is_one_line_error(tmp_path):
    with pytest.raises(BundleError) as err:
        load_bundle(write_bundle(tmp_path, "{not json"))
    assert "not valid JSON" in str(err.value) and "\n" not in str(err.value)


def test_missing_rootfs(tmp_path):
    with pytest.raises(BundleError, match="rootfs .* does not exist"):
        load_bundle(write_bundle(tmp_path, default_spec(), make_rootfs=False))


def test_missing_config(tmp_path):
    with pytest.raises(BundleError, match="config.json not found"):
        load_bundle(tmp_path)


def test_empty_args_refused(tmp_path):
    spec = default_spec()
    spec["process"]["args"] = []
    with pytest.raises(BundleError, match="process.args"):
        load_bundle(write_bundle(tmp_path, spec))


def test_guest_spec_rewrites_host_paths():
    spec = default_spec()
    spec["hooks"] = {"prestart": [{"path": "/usr/bin/true"}], "startContainer": [{"path": "/bin/true"}]}
    spec["mounts"].append({"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                           "options": ["rbind", "ro"]})
    spec["linux"]["namespaces"] = [
        {"type": "network", "path": "/var/run/netns/cni-1"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "pid"},
    ]
    spec["linux"]["cgroupsPath"] = "/kubepods/besteffort/pod1/abc"
    guest = guest_spec(spec, "c1")
    assert guest["root"]["path"] == f"{SHARED_DIR}/c1/rootfs"
    assert guest["mounts"][-1]["source"] == f"{SHARED_DIR}/c1/mounts/{len(spec['mounts']) - 1}"
    assert guest["mounts"][0] == spec["mounts"][0]  # proc is not a bind: untouched
    assert guest["hooks"] == {"startContainer": [{"path": "/bin/true"}]}  # run by crun in the container
    # The pod's network namespace is the guest's own, joined by path.
    assert guest["linux"]["namespaces"] == [{"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc"},
                                            {"type": "pid"}, {"type": "mount"}]  # always one of its own
    assert guest["linux"]["cgroupsPath"] == "/vmrun/c1"
    # The caller's spec is not modified.
    assert spec["root"]["path"] == "rootfs" and "prestart" in spec["hooks"]


def test_only_a_pod_member_asking_for_its_own_network_gets_a_new_one_in_the_guest():
    spec = default_spec()
    assert {"type": "network"} in spec["linux"]["namespaces"]
    # The guest's owner: vmrun made its namespace on the host and carries it into the guest.
    assert {"type": "network", "path": "/proc/1/ns/net"} in guest_spec(spec, "c1")["linux"]["namespaces"]
    assert {"type": "network"} in guest_spec(spec, "c1", owns_guest=False)["linux"]["namespaces"]
    spec["linux"]["namespaces"].remove({"type": "network"})  # the host's network: the guest's
    assert all(ns["type"] != "network" for ns in guest_spec(spec, "c1")["linux"]["namespaces"])


def test_guest_spec_and_exec_drop_the_hosts_security_labels():
    spec = default_spec()
    spec["process"].update(apparmorProfile="docker-default", selinuxLabel="system_u:system_r:container_t:s0")
    spec["linux"]["mountLabel"] = "system_u:object_r:container_file_t:s0"
    guest = guest_spec(spec, "c1")
    assert "apparmorProfile" not in guest["process"] and "selinuxLabel" not in guest["process"]
    assert "mountLabel" not in guest["linux"]
    assert guest["process"]["args"] == spec["process"]["args"]
    exec_process = guest_process({"args": ["ls"], "apparmorProfile": "docker-default"})
    assert exec_process == {"args": ["ls"]}
    assert spec["process"]["apparmorProfile"] == "docker-default"  # the caller's, untouched


def test_spec_refuses_to_overwrite(tmp_path):
    config = write_default_spec(tmp_path)
    assert json.loads(config.read_text())["process"]["args"] == ["sh"]
    with pytest.raises(BundleError, match="exists"):
        write_default_spec(tmp_path)


def test_guest_spec_joins_the_pod_sandbox_in_the_guest():
    spec = default_spec()
    spec["linux"]["namespaces"] = [
        {"type": "pid", "path": "/proc/4242/ns/pid"},
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "network", "path": "/proc/4242/ns/net"},
        {"type": "uts", "path": "/proc/999/ns/uts"},  # not the sandbox: a new namespace
        {"type": "mount"},
    ]
    guest = guest_spec(spec, "c2", guest_pids={4242: 17})
    assert guest["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/17/ns/pid"},
        {"type": "ipc", "path": "/proc/17/ns/ipc"},
        {"type": "network", "path": "/proc/1/ns/net"},
        {"type": "uts"},
        {"type": "mount"},
    ]


@pytest.mark.parametrize("version", ["1.0.0", "1.0.2", "1.1.0", "1.2.1", "1.3.0", "1.0.2-dev"])
def test_any_1x_spec_loads_and_the_guest_gets_a_version_its_crun_reads(tmp_path, version):
    spec = default_spec()
    spec["ociVersion"] = version
    bundle = load_bundle(write_bundle(tmp_path, spec))
    assert guest_spec(bundle.spec, "c1")["ociVersion"] == "1.0.2"


@pytest.mark.parametrize("version", ["0.9.0", "2.0.0", "1.x", "", "latest"])
def test_other_versions_are_refused_in_one_line(tmp_path, version):
    spec = default_spec()
    spec["ociVersion"] = version
    with pytest.raises(BundleError, match="is not a 1.x version") as refused:
        load_bundle(write_bundle(tmp_path, spec))
    assert "\n" not in str(refused.value)


def test_kernel_memory_limits_are_dropped_with_a_warning(caplog):
    spec = default_spec()
    spec["linux"]["resources"]["memory"] = {"limit": 1 << 30, "kernel": 1 << 20, "kernelTCP": 1 << 20}
    guest = guest_spec(spec, "c1")
    assert guest["linux"]["resources"]["memory"] == {"limit": 1 << 30}
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "kernelTCP" in caplog.text


@pytest.mark.parametrize("kind, path, message", [
    ("pid", "/proc/self/ns/net", "is not a pid namespace but a network one"),
    ("network", "/proc/self/ns/ipc", "is not a network namespace but a ipc one"),
    ("ipc", "/etc/hostname", "is not a ipc namespace: not a namespace file"),
    ("uts", "/nonexistent/ns", "uts namespace /nonexistent/ns: No such file"),
])
def test_a_namespace_path_of_the_wrong_type_is_refused(tmp_path, kind, path, message):
    spec = default_spec()
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != kind]
    spec["linux"]["namespaces"].append({"type": kind, "path": path})
    with pytest.raises(BundleError, match=message):
        load_bundle(write_bundle(tmp_path, spec))


def test_namespace_paths_of_the_right_type_load(tmp_path):
    spec = default_spec()
    spec["linux"]["namespaces"] = [{"type": kind, "path": f"/proc/self/ns/{name}"}
                                   for kind, name in (("pid", "pid"), ("network", "net"), ("ipc", "ipc"),
                                                      ("uts", "uts"), ("mount", "mnt"), ("cgroup", "cgroup"))]
    assert load_bundle(write_bundle(tmp_path, spec)).spec["linux"]["namespaces"][1]["path"] == "/proc/self/ns/net"


def test_an_unknown_namespace_type_is_refused(tmp_path):
    spec = default_spec()
    spec["linux"]["namespaces"].append({"type": "bogus"})
    with pytest.raises(BundleError, match="unknown namespace"):
        load_bundle(write_bundle(tmp_path, spec))


def _with(path, value):
    """default_spec() with the field at `path` (dotted) set to `value`."""
    spec = default_spec()
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


@pytest.mark.parametrize("path, value, message", [
    ("hostname", 5, "hostname must be a string"),
    ("annotations", ["x"], "annotations must be an object of strings"),
    ("annotations", {"io.kubernetes.cri.sandbox-id": 5}, "annotations must be an object of strings"),
    ("linux.namespaces", 5, "linux.namespaces must be a list"),
    ("linux.namespaces", [{"type": "pid", "path": 5}], "linux.namespaces must be a list"),
    ("process", ["sh"], "process must be an object"),
    ("process.terminal", "false", "process.terminal must be true or false"),
    ("process.cwd", "tmp", "process.cwd must be an absolute path"),
    ("process.env", "PATH=/bin", "process.env must be a list of strings"),
    ("process.user", {"uid": "0", "gid": 0}, "process.user must be an object"),
    ("process.user", {"uid": 0, "gid": 0, "additionalGids": [-1]}, "process.user must be an object"),
    ("process.capabilities", {"bounding": "CAP_KILL"}, "process.capabilities must be an object of lists"),
    ("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": "1", "hard": 2}], "process.rlimits must be a list"),
    ("mounts", [{"destination": "/d", "source": 5, "type": "bind"}], "source and type must be strings"),
    ("mounts", [{"destination": "/d", "options": "ro"}], "options a list of strings"),
])
def test_a_mistyped_field_is_one_line_error_before_anything_starts(tmp_path, path, value, message):
    with pytest.raises(BundleError) as err:
        load_bundle(write_bundle(tmp_path, _with(path, value)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_config_that_is_not_utf8_is_one_line_error(tmp_path):
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_bytes(json.dumps(default_spec()).encode().replace(b'"sh"', b'"\xff"'))
    with pytest.raises(BundleError, match="config.json is not UTF-8 text"):
        load_bundle(tmp_path)


def test_the_specs_own_types_load(tmp_path):
    spec = _with("process.user", {"uid": 1000, "gid": 1000, "additionalGids": [5, 6]})
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
    spec["mounts"].append({"destination": "/data", "source": "/srv", "type": "bind", "options": ["rbind", "ro"]})
    spec["annotations"] = {"io.kubernetes.cri.container-type": "sandbox"}
    spec["hostname"] = "pod"
    assert load_bundle(write_bundle(tmp_path, spec)).spec == spec


def test_null_is_unset_as_runcs_decoder_takes_it(tmp_path):
    spec = default_spec()
    spec.update(hostname=None, annotations=None)
    spec["process"].update(env=None, cwd=None, terminal=None, capabilities={"bounding": None})
    spec["linux"]["namespaces"].append({"type": "ipc", "path": None})
    load_bundle(write_bundle(tmp_path, spec))
