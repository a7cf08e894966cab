"""A private containerd whose CRI plugin drives vmrun, and Python stubs for the CRI v1 API.

No crictl: the CRI v1 `api.proto` ships in no Debian binary package, only in containerd's
source package (vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto). `cri_stubs()` fetches
that source with `apt-get source`, using deb-src lists derived from the machine's own apt
sources in a scratch directory (/etc/apt is never touched), takes `gogo.proto` from
golang-github-gogo-protobuf-dev, and generates the stubs with grpcio-tools into a cache
outside the repository (/var/cache/vmrun-tests, or $VMRUN_TEST_CACHE), reused when present.

`CriEnv` runs containerd in a network namespace of its own, with every path it owns under
one short temporary directory and VMRUN_CONFIG pointing at a private vmrun configuration.
Its config is docs/callers.md's snippet (`containerd_config`): by default
`containerd-cri`, the runtime handler "vmrun" (runc v2 shim, BinaryName = the vmrun next
to this Python); with flavor "untrusted-v1", the version 1 `untrusted_workload_runtime`.
`close()` stops it and reports anything left behind: processes mentioning its directory
(cmdline or environment), mounts, the netns, sandbox dirs in vmrun's run_dir/vm, state.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import grpc
import tomli_w

import doc_snippets as doc
from ctrlib import PrivateContainerdPaths
from images import PAUSE_CMD, write_archives
from leftovers import mounts_under, processes_mentioning

CACHE_ROOT = Path(os.environ.get("VMRUN_TEST_CACHE", "/var/cache/vmrun-tests"))
GOGO_PROTO = Path("/usr/share/gocode/src/github.com/gogo/protobuf/gogoproto/gogo.proto")
CRI_PROTO_IN_SOURCE = "vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"
STUB_PACKAGE = "cri_v1"  # the generated modules: cri_v1.api_pb2, cri_v1.api_pb2_grpc

VMRUN_BINARY = Path(sys.executable).parent / "vmrun"
RUNTIME_HANDLER = "vmrun"
CRI_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "pause:1"
BUSYBOX_IMAGE = "bbx:latest"


class CriSetupError(RuntimeError):
    """The CRI stubs or the private containerd could not be set up."""


def _run(argv: list[str], *, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise CriSetupError(f"{' '.join(argv)} failed (rc {result.returncode}):\n{result.stdout}{result.stderr}")
    return result


# ---------------------------------------------------------------- CRI stubs


def _installed_containerd_source() -> tuple[str, str]:
    out = _run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}", "containerd"]).stdout.split()
    if len(out) != 2:
        raise CriSetupError(f"cannot tell the installed containerd's source version: {out}")
    return out[0], out[1]


def _deb_src_parts(parts_dir: Path) -> None:
    """deb-src versions of the machine's enabled apt sources, one-line and deb822 alike."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    n = 0
    for path in lists:
        if not path.is_file():
            continue
        lines = [re.sub(r"^deb(\s)", r"deb-src\1", line) for line in path.read_text().splitlines()
                 if re.match(r"^deb\s", line)]
        if lines:
            (parts_dir / f"src{n}.list").write_text("\n".join(lines) + "\n")
            n += 1
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = re.sub(r"(?im)^(Types:).*$",
                      lambda m: m.group(1) + " deb-src" if re.search(r"\bdeb\b", m.group(0)) else m.group(0),
                      path.read_text())
        (parts_dir / f"src{n}.sources").write_text(text)
        n += 1
    if n == 0:
        raise CriSetupError("no apt sources found in /etc/apt to derive deb-src entries from")


def fetch_cri_proto(work: Path) -> Path:
    """containerd's vendored CRI v1 api.proto, from Debian's source package, under `work`."""
    package, version = _installed_containerd_source()
    apt_dir = work / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True)
    _deb_src_parts(apt_dir / "parts")
    options = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={apt_dir / 'parts'}",
               "-o", f"Dir::State::Lists={apt_dir / 'lists'}", "-o", "APT::Sandbox::User=root", "-q"]
    # Some third-party source may have no deb-src: what matters is that the next step works.
    update = _run(["apt-get", *options, "update"], timeout=300, check=False)
    src = work / "src"
    src.mkdir()
    attempts = []
    for wanted in (f"{package}={version}", package):  # the exact version, else the archive's
        result = _run(["apt-get", *options, "source", wanted], cwd=src, timeout=300, check=False)
        attempts.append(f"$ apt-get source {wanted}: rc {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        found = glob.glob(str(src / "*" / CRI_PROTO_IN_SOURCE))
        if result.returncode == 0 and found:
            return Path(found[0])
    raise CriSetupError("could not fetch containerd's source package for the CRI api.proto "
                        "(needs dpkg-dev and a reachable Debian archive):\n"
                        f"$ apt-get update: rc {update.returncode}\n{update.stderr[-2000:]}\n" + "\n".join(attempts))


def _generate_stubs(target: Path) -> None:
    if not GOGO_PROTO.is_file():
        raise CriSetupError(f"{GOGO_PROTO} missing: install golang-github-gogo-protobuf-dev (scripts/setup.sh)")
    import grpc_tools

    with tempfile.TemporaryDirectory(prefix="cri-stubs-", dir=target.parent) as tmp:
        work = Path(tmp)
        api_proto = fetch_cri_proto(work)
        proto = work / "out" / "proto" / STUB_PACKAGE
        proto.mkdir(parents=True)
        # Same proto, with gogo.proto imported from beside it: the generated modules then
        # form one importable package (a "github.com/..." path would not be one).
        text = api_proto.read_text()
        gogo_import = 'import "github.com/gogo/protobuf/gogoproto/gogo.proto";'
        if gogo_import not in text:
            raise CriSetupError(f"{api_proto} does not import gogo.proto as expected")
        (proto / "api.proto").write_text(text.replace(gogo_import, f'import "{STUB_PACKAGE}/gogo.proto";'))
        shutil.copy(GOGO_PROTO, proto / "gogo.proto")
        py = work / "out" / "py"
        py.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        _run([sys.executable, "-m", "grpc_tools.protoc", f"-I{work / 'out' / 'proto'}", f"-I{well_known}",
              f"--python_out={py}", f"--grpc_python_out={py}",
              str(proto / "api.proto"), str(proto / "gogo.proto")])
        (py / STUB_PACKAGE / "__init__.py").write_text("")
        (work / "out" / "SOURCE").write_text(f"{api_proto.relative_to(work / 'src')}\n")
        os.rename(work / "out", target)


def cri_stubs() -> tuple[ModuleType, ModuleType]:
    """(api_pb2, api_pb2_grpc) for the CRI v1 API of the installed containerd."""
    from importlib.metadata import version

    _, ctd_version = _installed_containerd_source()
    key = re.sub(r"[^A-Za-z0-9.+-]", "_", f"containerd-{ctd_version}-grpcio-tools-{version('grpcio-tools')}")
    base = CACHE_ROOT / "cri-v1"
    base.mkdir(parents=True, exist_ok=True)
    target = base / key
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs generate once
        if not (target / "py" / STUB_PACKAGE / "api_pb2_grpc.py").is_file():
            shutil.rmtree(target, ignore_errors=True)
            _generate_stubs(target)
    py = str(target / "py")
    if py not in sys.path:
        sys.path.insert(0, py)
    return (importlib.import_module(f"{STUB_PACKAGE}.api_pb2"),
            importlib.import_module(f"{STUB_PACKAGE}.api_pb2_grpc"))


# ---------------------------------------------------------------- leftovers


def shim_socket(containerd_address: str, namespace: str, task_id: str) -> Path:
    """Where containerd 1.6 puts the runc v2 shim's socket for a task (or a pod's group)."""
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, task_id).encode()).hexdigest()
    return Path("/run/containerd/s") / digest


# ---------------------------------------------------------------- the private containerd


# Which snippet of docs/callers.md a CriEnv's containerd runs: the runc v2 shim with
# BinaryName (the handler "vmrun"), or the legacy version 1 `untrusted_workload_runtime`.
CONFIG_SNIPPETS = {"runc-v2": "containerd-cri", "untrusted-v1": "containerd-untrusted-v1",
                   "shim-v2": "containerd-shimv2"}
V2_FLAVORS = ("runc-v2", "shim-v2")  # containerd config version 2, tasks of the v2 runtime


def containerd_config(base: Path, runtime_root: Path, flavor: str = "runc-v2") -> dict:
    """containerd's configuration: the doc's snippet, its host paths made the test's, plus
    only what a private containerd needs on top (its own root, state, sockets, CNI dirs and
    sandbox image, debug logs): `add_keys` refuses to change anything the snippet sets."""
    name = CONFIG_SNIPPETS[flavor]
    if flavor in V2_FLAVORS:
        # The shim v2's snippet names no host path: the shim is found on containerd's PATH.
        paths = {doc.VMRUN_BINARY: VMRUN_BINARY, doc.CONTAINERD_ROOT: runtime_root} if flavor == "runc-v2" else {}
        cri, opt = "io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"  # version 2 plugin ids
    else:
        paths = {doc.VMRUN_BINARY: VMRUN_BINARY, doc.VMRUN_ROOT: runtime_root}
        cri, opt = "cri", "opt"  # version 1 plugin names
    try:
        documented = tomllib.loads(doc.for_host(doc.snippet(name), paths))
    except (KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise CriSetupError(f"docs/callers.md, snippet {name}: {exc}") from exc
    plugin: dict = {
        "sandbox_image": f"docker.io/library/{PAUSE_IMAGE}",
        "netns_mounts_under_state_dir": True,
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
        "cni": {"bin_dir": "/usr/lib/cni", "conf_dir": f"{base}/cni"},
    }
    if flavor in V2_FLAVORS:
        runtimes = documented.get("plugins", {}).get(cri, {}).get("containerd", {}).get("runtimes", {})
        if RUNTIME_HANDLER not in runtimes:
            raise CriSetupError(f"docs/callers.md, snippet {name}: no runtime {RUNTIME_HANDLER!r}")
        # runc's state, should a pod use the default handler: under base, not /run/containerd.
        plugin["containerd"] = {"runtimes": {"runc": {"options": {"Root": f"{base}/runc-root"}}}}
    test_only = {
        "root": f"{base}/root",
        "state": f"{base}/state",
        "grpc": {"address": f"{base}/c.sock"},
        "ttrpc": {"address": f"{base}/c-ttrpc.sock"},
        "debug": {"level": "debug"},
        "plugins": {opt: {"path": f"{base}/opt"}, cri: plugin},
    }
    try:
        return doc.add_keys(documented, test_only)
    except ValueError as exc:
        raise CriSetupError(f"docs/callers.md, snippet {name}: {exc}") from exc


# The pod network: a bridge in containerd's netns, pods in 198.18.8.0/24 (test-only range).
POD_SUBNET_GATEWAY = "198.18.8.1"


def cni_bridge_conf(base: Path) -> dict:
    """The bridge plugin, its IPAM state under `base` (not /var/lib/cni)."""
    return {
        "cniVersion": "1.0.0",
        "name": "vmrun-test",
        "plugins": [{
            "type": "bridge", "bridge": "vmrunbr0", "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(base / "ipam"), "routes": [{"dst": "0.0.0.0/0"}],
                     "ranges": [[{"subnet": "198.18.8.0/24", "gateway": POD_SUBNET_GATEWAY}]]},
        }],
    }


@dataclass
class CriEnv(PrivateContainerdPaths):
    api: ModuleType
    api_grpc: ModuleType
    templates_dir: Path  # vmrun's: the session's, so the template is built once
    flavor: str = "runc-v2"  # which of CONFIG_SNIPPETS containerd runs
    base: Path | None = field(init=False, default=None)
    netns: str = field(init=False, default="")
    containerd: subprocess.Popen | None = field(init=False, default=None)
    channel: grpc.Channel | None = field(init=False, default=None)

    # -- paths (and those of PrivateContainerdPaths)
    @property
    def runtime_root(self) -> Path:
        return self.base / "vstate"  # the runtime's --root is runtime_root/<namespace>

    @property
    def task_dir(self) -> Path:  # the bundles, with vmrun's --log (log.json)
        runtime = "io.containerd.runtime.v2.task" if self.flavor in V2_FLAVORS else "io.containerd.runtime.v1.linux"
        return self.base / "state" / runtime / CRI_NAMESPACE

    @property
    def log_dir(self) -> Path:
        return self.base / "pods"

    def vm_dirs(self) -> list[Path]:
        vm = self.run_dir / "vm"
        return sorted(vm.iterdir()) if vm.is_dir() else []

    def vmrun_states(self) -> list[Path]:
        root = self.runtime_root / CRI_NAMESPACE
        return sorted(root.iterdir()) if root.is_dir() else []

    def qemu_processes(self) -> list[str]:
        return [p for p in processes_mentioning(str(self.run_dir)) if "qemu-system" in p]

    # -- life cycle
    def start(self) -> CriEnv:
        if not VMRUN_BINARY.is_file():
            raise CriSetupError(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh)")
        self.base = Path(tempfile.mkdtemp(prefix="vcri", dir="/tmp"))  # short: unix socket paths
        self.netns = f"vcri-{secrets.token_hex(4)}"
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        for sub in ("cni", "pods", "images"):
            (self.base / sub).mkdir()
        # Pods that ask for a network get one from the bridge plugin, inside our netns.
        (self.base / "cni" / "10-vmrun-test.conflist").write_text(json.dumps(cni_bridge_conf(self.base)))
        self.vmrun_config.write_text(f'run_dir = "{self.run_dir}"\nboot_timeout = 120\nlog_level = "debug"\n'
                                     f'templates_dir = "{self.templates_dir}"\n')
        config = self.base / "containerd.toml"
        config.write_text(tomli_w.dumps(containerd_config(self.base, self.runtime_root, self.flavor)))
        # containerd finds containerd-shim-vmrun-v2 on its PATH: the one beside this Python.
        env = {**os.environ, "VMRUN_CONFIG": str(self.vmrun_config),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        with open(self.base / "containerd.log", "wb") as log:
            # Only the network namespace is private: mounts stay visible to the checks.
            self.containerd = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.runtime.Version(self.api.VersionRequest(), timeout=5)
                break
            except grpc.RpcError:
                if self.containerd.poll() is not None or time.monotonic() > deadline:
                    raise CriSetupError(f"containerd did not answer on {self.address}:\n{self.containerd_log()}")
                time.sleep(0.2)
        self._import_images()
        return self

    def _import_images(self) -> None:
        images = self.base / "images"
        for ref, cmd in ((PAUSE_IMAGE, PAUSE_CMD), (BUSYBOX_IMAGE, ("/bin/sh",))):
            tar = images / (ref.replace(":", "-") + ".tar")
            write_archives(ref, tar, None, cmd)
            self.ctr("image", "import", str(tar))
        deadline = time.monotonic() + 30  # the CRI plugin learns of imported images by events
        wanted = {f"docker.io/library/{PAUSE_IMAGE}", f"docker.io/library/{BUSYBOX_IMAGE}"}
        while True:
            listed = self.images.ListImages(self.api.ListImagesRequest(), timeout=30).images
            tags = {tag for image in listed for tag in image.repo_tags}
            if wanted <= tags:
                return
            if time.monotonic() > deadline:
                raise CriSetupError(f"the CRI plugin does not list the imported images: {sorted(tags)}")
            time.sleep(0.2)

    def ctr(self, *args: str, timeout: float = 120) -> str:
        return _run(["ctr", "--address", self.address, "-n", CRI_NAMESPACE, *args], timeout=timeout).stdout

    @property
    def runtime(self):
        return self.api_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self):
        return self.api_grpc.ImageServiceStub(self.channel)

    # -- diagnostics
    def containerd_log(self, lines: int = 60) -> str:
        """The last lines of containerd's log above debug level (the shim's errors are there)."""
        path = self.base / "containerd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join([line for line in text.splitlines() if "level=debug" not in line][-lines:])

    def diagnostics(self) -> str:
        """vmrun's --log lines (task dirs), guest consoles, containerd's log tail, state."""
        parts = []
        for log in sorted(self.task_dir.glob("*/log.json")) if self.task_dir.is_dir() else []:
            text = log.read_text(errors="replace").splitlines()
            parts.append(f"--- vmrun --log {log} (last 40 lines)\n" + "\n".join(text[-40:]))
        for vm in self.vm_dirs():
            for log in sorted(vm.glob("*.log")):
                text = log.read_text(errors="replace").splitlines()
                parts.append(f"--- {log} (last 30 lines)\n" + "\n".join(text[-30:]))
        for log in sorted(self.run_dir.glob("daemon-logs/shimv2-*.log")):  # the shim v2's own
            text = log.read_text(errors="replace").splitlines()
            parts.append(f"--- {log} (last 30 lines)\n" + "\n".join(text[-30:]))
        parts.append(f"--- vm dirs: {self.vm_dirs()}\n--- vmrun states: {self.vmrun_states()}")
        parts.append(f"--- containerd.log (last 60 lines above debug)\n{self.containerd_log()}")
        return "\n".join(parts)

    # -- teardown
    def _remove_all_pods(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for pod in self.runtime.ListPodSandbox(self.api.ListPodSandboxRequest(), timeout=30).items:
                with contextlib.suppress(grpc.RpcError):
                    self.runtime.StopPodSandbox(self.api.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=120)
                with contextlib.suppress(grpc.RpcError):
                    self.runtime.RemovePodSandbox(self.api.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                                  timeout=120)

    def close(self) -> list[str]:
        """Stop everything; the list of what was found left behind (empty when clean)."""
        problems: list[str] = []
        if self.base is None:
            return problems
        if self.containerd is not None:
            if self.containerd.poll() is None:
                self._remove_all_pods()
            if self.channel is not None:
                self.channel.close()
            if self.containerd.poll() is None:
                self.containerd.send_signal(signal.SIGTERM)
                try:
                    self.containerd.wait(30)
                except subprocess.TimeoutExpired:
                    self.containerd.kill()
                    self.containerd.wait(10)
                    problems.append("containerd did not stop on SIGTERM within 30 s")
        text = str(self.base)
        deadline = time.monotonic() + 20
        while processes_mentioning(text) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = processes_mentioning(text)
        vm_dirs = self.vm_dirs()
        states = self.vmrun_states()
        for line in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        mounts = mounts_under(self.base)
        for point in sorted(mounts, key=len, reverse=True):
            _run(["umount", "-l", point], check=False)
        if self.netns:
            _run(["ip", "netns", "del", self.netns], check=False)
        netns_mounts = mounts_under(f"/run/netns/{self.netns}") if self.netns else []
        if leftovers:
            problems.append(f"processes left behind: {leftovers}")
        if mounts:
            problems.append(f"mounts left behind: {mounts}")
        if vm_dirs:
            problems.append(f"vmrun sandbox dirs left behind: {vm_dirs}")
        if states:
            problems.append(f"vmrun state left behind: {states}")
        if netns_mounts or (self.netns and Path(f"/run/netns/{self.netns}").exists()):
            problems.append(f"network namespace {self.netns} left behind")
        if problems:
            problems.append(f"(kept {self.base} for inspection)\n" + self.containerd_log(30))
        elif not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def cri_session(templates_dir: Path, flavor: str = "runc-v2") -> Iterator[CriEnv]:
    """A module's CriEnv (the body of its fixture): started, yielded, then closed and
    checked for leftovers; the test fails at once when the stubs cannot be made."""
    import pytest

    from leftovers import client_session

    try:
        api, api_grpc = cri_stubs()
    except CriSetupError as exc:
        pytest.fail(f"cannot generate the CRI v1 stubs: {exc}")
    env = CriEnv(api, api_grpc, templates_dir, flavor=flavor)
    yield from client_session(env, env.start)
