"""OCI bundles: loading and checking config.json, the default spec (made in
vmrun/common/default_spec.py), and the guest's copy."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmrun.common.constants import POD_NETNS, SHARED_DIR, container_rootfs
from vmrun.common.default_spec import OCI_VERSION, default_spec  # noqa: F401
from vmrun.errors import BundleError, InvalidIdError
from vmrun.hooks import GUEST_HOOKS, parse_hooks
from vmrun.namespaces import check_namespace_paths
from vmrun.resources import check_resources

log = logging.getLogger("vmrun.oci")

# runc takes a spec of any 1.x version. The crun in the guest (1.8.1) reads 1.0.x and 1.1.0
# only, and ignores the fields it does not know: it gets the spec under this version.
GUEST_OCI_VERSION = OCI_VERSION
MAX_OCI_VERSION = "1.3.0"  # the newest version `vmrun features` says it takes
_OCI_VERSION_PATTERN = re.compile(r"^1\.\d+\.\d+(-[0-9A-Za-z.+-]+)?$")
# Kernel memory limits: cgroup v2 (the guest's) has none; runc ignores them too.
_IGNORED_MEMORY_LIMITS = ("kernel", "kernelTCP")

# runc's rule: word characters, '+', '-' and '.', and never "." or "..".
_ID_PATTERN = re.compile(r"^[\w+.-]+$", re.ASCII)
_MAX_ID_LENGTH = 255  # the id names its state directory: a file name


def validate_id(container_id: str) -> str:
    if (
        not container_id
        or container_id in (".", "..")
        or len(container_id) > _MAX_ID_LENGTH
        or not _ID_PATTERN.match(container_id)
    ):
        raise InvalidIdError(f"invalid container id {container_id!r}: use letters, digits, '_', '+', '-' and '.'")
    return container_id


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict
    rootfs: Path

    @property
    def terminal(self) -> bool:
        return bool(self.spec["process"].get("terminal"))


def _require(condition: bool, bundle: Path, message: str) -> None:
    if not condition:
        raise BundleError(f"bundle {bundle}: {message}")


def _is_list_of(value: object, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) and not isinstance(item, bool) for item in value)


def _field(obj: dict, key: str, default: object) -> object:
    """obj[key], or `default` when absent or null (Go's decoder, runc's, takes null as unset)."""
    value = obj.get(key)
    return default if value is None else value


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no number


def _is_id_number(value: object) -> bool:
    return _is_integer(value) and 0 <= value < 1 << 32  # type: ignore[operator]


def process_problem(process: object) -> str:
    """What makes `process` (a spec's, or an exec's --process) not a process, as the
    runtime spec types it; "" if nothing. crun in the guest checks the rest."""
    if not isinstance(process, dict):
        return "process must be an object"
    args = process.get("args")
    if not (_is_list_of(args, str) and args):
        return "process.args must be a non-empty list of strings"
    if not isinstance(_field(process, "terminal", False), bool):
        return "process.terminal must be true or false"
    cwd = _field(process, "cwd", "/")
    if not (isinstance(cwd, str) and cwd.startswith("/")):
        return "process.cwd must be an absolute path"
    if not _is_list_of(_field(process, "env", []), str):
        return "process.env must be a list of strings"
    user = _field(process, "user", {})
    if not (isinstance(user, dict) and all(_is_id_number(_field(user, key, 0)) for key in ("uid", "gid"))
            and isinstance(_field(user, "additionalGids", []), list)
            and all(_is_id_number(gid) for gid in _field(user, "additionalGids", []))):
        return "process.user must be an object with numeric uid, gid and additionalGids"
    capabilities = _field(process, "capabilities", {})
    if not (isinstance(capabilities, dict)
            and all(_is_list_of(names, str) for names in capabilities.values() if names is not None)):
        return "process.capabilities must be an object of lists of capability names"
    rlimits = _field(process, "rlimits", [])
    if not (isinstance(rlimits, list) and all(
            isinstance(limit, dict) and isinstance(limit.get("type"), str)
            and _is_integer(limit.get("soft")) and _is_integer(limit.get("hard"))
            for limit in rlimits)):
        return "process.rlimits must be a list of {type, soft, hard}"
    return ""


def _spec_problem(spec: dict) -> str:
    """What is mistyped in the spec's fields outside process, root and hooks; "" if nothing."""
    if not isinstance(_field(spec, "hostname", ""), str):
        return "hostname must be a string"
    annotations = _field(spec, "annotations", {})
    if not (isinstance(annotations, dict) and all(isinstance(value, str) for value in annotations.values())):
        return "annotations must be an object of strings"
    for mount in spec.get("mounts", []):
        if not all(isinstance(_field(mount, key, ""), str) for key in ("source", "type")) \
                or not _is_list_of(_field(mount, "options", []), str):
            return f"mount {mount.get('destination')!r}: source and type must be strings, options a list of strings"
    linux = spec.get("linux") or {}
    namespaces = _field(linux, "namespaces", [])
    if not (isinstance(namespaces, list) and all(
            isinstance(namespace, dict) and isinstance(namespace.get("type"), str)
            and isinstance(_field(namespace, "path", ""), str) for namespace in namespaces)):
        return "linux.namespaces must be a list of {type, path}"
    return ""


def load_bundle(bundle_dir: str | Path) -> Bundle:
    path = Path(bundle_dir).absolute()
    config = path / "config.json"
    try:
        text = config.read_bytes().decode()
    except UnicodeDecodeError:
        raise BundleError(f"bundle {path}: config.json is not UTF-8 text") from None
    except FileNotFoundError:
        raise BundleError(f"bundle {path}: config.json not found") from None
    except OSError as exc:
        raise BundleError(f"bundle {path}: cannot read config.json: {exc.strerror}") from None
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"bundle {path}: config.json is not valid JSON: {exc}") from None
    _require(isinstance(spec, dict), path, "config.json must hold a JSON object")
    _require(isinstance(spec.get("ociVersion"), str), path, "config.json has no ociVersion")
    _require(bool(_OCI_VERSION_PATTERN.match(spec["ociVersion"])), path,
             f"ociVersion {spec['ociVersion']!r} is not a 1.x version (this runtime takes 1.0.0 to {MAX_OCI_VERSION})")
    _require("process" in spec, path, "config.json has no process")
    problem = process_problem(spec["process"])
    _require(not problem, path, problem)
    root = spec.get("root")
    _require(isinstance(root, dict) and isinstance(root.get("path"), str) and bool(root["path"]), path,
             "config.json has no root.path")
    rootfs = Path(root["path"])
    if not rootfs.is_absolute():
        rootfs = path / rootfs
    _require(rootfs.is_dir(), path, f"rootfs {rootfs} does not exist or is not a directory")
    # As runc: the guest would write the host's own root filesystem through the share.
    _require(not is_host_root(rootfs.stat()), path, f"rootfs {rootfs} is the host's root directory")
    mounts = spec.get("mounts", [])
    _require(isinstance(mounts, list) and all(isinstance(m, dict) and isinstance(m.get("destination"), str)
                                              for m in mounts), path, "mounts must be a list of objects with a destination")
    linux = spec.get("linux")
    _require(linux is None or isinstance(linux, dict), path, "linux must be an object")
    problem = _spec_problem(spec)
    _require(not problem, path, problem)
    check_namespace_paths(spec)
    if linux is not None:
        try:
            check_resources(linux.get("resources"))
        except BundleError as exc:
            raise BundleError(f"bundle {path}: {exc}") from None
    try:
        parse_hooks(spec)
    except BundleError as exc:
        raise BundleError(f"bundle {path}: {exc}") from None
    return Bundle(path, spec, rootfs)


def is_host_root(info: os.stat_result) -> bool:
    """Whether `info` (a stat) is of this host's root directory."""
    root = os.stat("/")
    return (info.st_dev, info.st_ino) == (root.st_dev, root.st_ino)


def is_bind_mount(mount: dict) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def guest_mount_source(container_id: str, index: int) -> str:
    """Where the host source of bind mount number `index` appears in the guest."""
    return f"{SHARED_DIR}/{container_id}/mounts/{index}"


_NAMESPACE_PATH = re.compile(r"^/proc/(\d+)/ns/(\w+)$")


def _network_namespace(spec: dict) -> dict | None:
    linux = spec.get("linux")
    for namespace in (linux.get("namespaces", []) if isinstance(linux, dict) else []):
        if isinstance(namespace, dict) and namespace.get("type") == "network":
            return namespace
    return None


def network_namespace_path(spec: dict) -> str:
    """The pod's network namespace (CNI's) the spec joins; "" for none or a new one."""
    namespace = _network_namespace(spec)
    return str(namespace.get("path") or "") if namespace else ""


def wants_new_network_namespace(spec: dict) -> bool:
    """Whether the spec asks for a network namespace of its own (one without a path)."""
    namespace = _network_namespace(spec)
    return namespace is not None and not namespace.get("path")


# Labels of the host's security modules: they name host policies, which the guest has not
# loaded (crun there fails on an AppArmor profile it cannot find). The guest's kernel is
# the container's boundary, as in Kata; its own LSMs have no profiles for containers.
_HOST_PROCESS_LABELS = ("apparmorProfile", "selinuxLabel")


def guest_process(process: dict) -> dict:
    """A process (a spec's, or an exec's) as crun gets it in the guest: host labels dropped."""
    return {key: value for key, value in process.items() if key not in _HOST_PROCESS_LABELS}


def guest_spec(spec: dict, container_id: str, guest_pids: dict[int, int] | None = None,
               owns_guest: bool = True) -> dict:
    """The spec crun gets inside the guest.

    The rootfs and bind-mount sources move to their places on the shared directory; host
    namespace paths and other host-only fields are dropped. A network namespace with a
    path is the pod's (CNI's) network, which in the guest is the guest's own network
    namespace: the container joins it by path (so crun applies its net.* sysctls there,
    as runc does in a namespace it joins). So does a new one asked for by the container
    that owns the guest: vmrun made it on the host, and carries it into the guest. Paths to
    the namespaces of a pod's sandbox process (`/proc/<host pid>/ns/...`, the pid being
    the sandbox's shim) are translated through `guest_pids` to that process in the guest.
    """
    guest = copy.deepcopy(spec)
    guest["ociVersion"] = GUEST_OCI_VERSION
    guest["root"]["path"] = container_rootfs(container_id)
    for index, mount in enumerate(guest.get("mounts", [])):
        if is_bind_mount(mount):
            mount["source"] = guest_mount_source(container_id, index)
    # Host hooks run on the host (hooks.py); startContainer runs in the container: crun's.
    hooks = guest.pop("hooks", None)
    guest_hooks = {kind: entries for kind, entries in (hooks or {}).items() if kind in GUEST_HOOKS and entries}
    if guest_hooks:
        guest["hooks"] = guest_hooks
    if isinstance(guest.get("process"), dict):
        guest["process"] = guest_process(guest["process"])
    linux = guest.get("linux")
    if isinstance(linux, dict):
        linux.pop("mountLabel", None)  # an SELinux context, like the process labels
        namespaces = []
        for namespace in linux.get("namespaces", []):
            path = namespace.get("path")
            if namespace.get("type") == "network" and (path or owns_guest):
                namespace = {"type": "network", "path": POD_NETNS}
            elif path:
                match = _NAMESPACE_PATH.match(path)
                guest_pid = (guest_pids or {}).get(int(match.group(1))) if match else None
                if guest_pid:
                    namespace = {"type": namespace["type"], "path": f"/proc/{guest_pid}/ns/{match.group(2)}"}
                else:
                    namespace = {"type": namespace["type"]}
            namespaces.append(namespace)
        if not any(namespace.get("type") == "mount" for namespace in namespaces):
            # Without one the container would share the mount namespace of the agent, not
            # the host's (which runc would give): crun then fails on the rootfs. The guest's
            # mounts are of no use to the container; it gets its own, as under Kata.
            namespaces.append({"type": "mount"})
        linux["namespaces"] = namespaces
        # Host cgroup paths mean nothing in the guest; crun makes its own.
        linux["cgroupsPath"] = f"/vmrun/{container_id}"
        memory = (linux.get("resources") or {}).get("memory")
        for limit in _IGNORED_MEMORY_LIMITS if isinstance(memory, dict) else ():
            if memory.pop(limit, None) is not None:
                log.warning("linux.resources.memory.%s is ignored: the guest's cgroup v2 has no kernel memory "
                            "limit (as runc)", limit)
    return guest


def write_default_spec(bundle_dir: Path) -> Path:
    config = bundle_dir / "config.json"
    if config.exists():
        raise BundleError(f"{config} exists: remove it first")
    config.write_text(json.dumps(default_spec(), indent=2) + "\n")
    return config
