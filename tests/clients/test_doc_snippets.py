"""Every configuration snippet of docs/callers.md, used as the real client's configuration.

The snippets are taken from the markdown (`<!-- snippet: NAME -->` before a fenced block,
tests/clients/doc_snippets.py), with only the documented host paths made the test's.
Which test runs which:

- `containerd-cri`: tests/clients/test_cri.py (its containerd's config is this snippet,
  cri_env.containerd_config), and here: containerd 1.6 loads its CRI plugin with it, and
  does not without the snippet's `runtimes.runc` entry (the doc's note).
- `containerd-untrusted-v1`: tests/clients/test_cri_legacy.py, and here: the same
  section in a version 2 file stops containerd (the doc's note).
- `podman-containers-conf`: podman 4.3 runs a container in a guest with it as its
  containers.conf (plus the test env's storage, tmp and event paths).
- `docker-daemon-json`: dockerd 20.10 runs a container in a guest with it as its
  daemon.json.
- `crio-dropin`: CRI-O is not packaged for Debian 12 (`apt-cache policy cri-o` has no
  candidate), so it is checked as TOML whose keys and value types are those CRI-O's
  crio.conf(5) documents (docs/crio.conf.5.md and pkg/config/config.go's toml tags in
  github.com/cri-o/cri-o, read at commit f954a17e, August 2026), and whose values are
  what the doc says they must be. Where a `crio` binary is installed, `crio config`
  also loads it.
- `kubernetes-runtimeclass`: parsed; its handler is the runtime the containerd and CRI-O
  snippets define, its `overhead.podFixed` covers the per-pod figures docs/memory.md
  marks (measured host MemAvailable and idle CPU per pod).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

import doc_snippets as doc
from leftovers import mounts_under, processes_mentioning

HOST_KERNEL = os.uname().release
SNIPPETS = {"containerd-cri", "containerd-shimv2", "containerd-untrusted-v1", "kubernetes-runtimeclass",
            "crio-dropin", "podman-containers-conf", "docker-daemon-json"}
CRI = "io.containerd.grpc.v1.cri"


@contextlib.contextmanager
def _started(env, *steps):
    """`env` after `steps`; closed however the test ends, and what it left fails the test."""
    failed = True
    try:
        for step in steps:
            step()
        yield env
        failed = False
    finally:
        problems = env.close()
        if problems and failed:
            print("left behind:\n" + "\n".join(problems))
    assert not problems, "left behind:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the markdown itself


def test_every_config_block_is_a_marked_snippet():
    assert doc.unmarked_config_blocks() == [], "docs/callers.md has config blocks no test takes"
    assert set(doc.all_snippets()) == SNIPPETS


def test_snippets_parse():
    for name, (language, text) in doc.all_snippets().items():
        if language == "toml":
            tomllib.loads(text)
        elif language == "json":
            json.loads(text)
        elif language == "yaml":
            pytest.importorskip("yaml").safe_load_all(text)
        else:
            pytest.fail(f"snippet {name}: unknown language {language!r}")


def test_host_paths_are_replaced_whole():
    text = 'a = "/run/containerd/vmrun"\nb = "/run/vmrun"\nc = "/run/vmrun/x"\n'
    assert doc.for_host(text, {doc.VMRUN_ROOT: "/T"}) == 'a = "/run/containerd/vmrun"\nb = "/T"\nc = "/run/vmrun/x"\n'
    with pytest.raises(ValueError):
        doc.for_host(text, {doc.VMRUN_BINARY: "/T"})  # not in the text: the doc changed
    with pytest.raises(ValueError):
        doc.add_keys({"a": {"b": 1}}, {"a": {"b": 2}})


# ---------------------------------------------------------------- containerd: what loads


def _containerd_loads(config: dict | str) -> tuple[str, str]:
    """Start containerd on `config` (the test's root, state and sockets added); (`ctr
    plugins ls` output, or "" if it never answered; containerd's log). Stopped after."""
    base = Path(tempfile.mkdtemp(prefix="vdoc", dir="/tmp"))
    try:
        if isinstance(config, dict):
            opt = "io.containerd.internal.v1.opt" if config.get("version") == 2 else "opt"
            config = tomli_w.dumps(doc.add_keys(config, {
                "root": f"{base}/root", "state": f"{base}/state", "grpc": {"address": f"{base}/c.sock"},
                "ttrpc": {"address": f"{base}/t.sock"}, "plugins": {opt: {"path": f"{base}/opt"}}}))
        (base / "config.toml").write_text(config)
        with open(base / "log", "wb") as log:
            process = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        plugins = ""
        try:
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                if not (base / "c.sock").exists():
                    time.sleep(0.1)
                    continue
                result = subprocess.run(["ctr", "--address", f"{base}/c.sock", "--connect-timeout", "5s",
                                         "plugins", "ls"], capture_output=True, text=True, timeout=30)
                if result.returncode == 0:
                    plugins = result.stdout
                    break
                time.sleep(0.3)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        assert not processes_mentioning(str(base)) and not mounts_under(base), "containerd left something"
        return plugins, (base / "log").read_text(errors="replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _cri_status(plugins: str) -> str:
    line = next((line for line in plugins.splitlines() if re.match(rf"{re.escape(CRI.rsplit('.', 1)[0])}\s+cri\s", line)),
                "")
    return line.split()[-1] if line else ""


@pytest.mark.clients
def test_containerd_loads_cri_with_the_runtime_snippet():
    config = tomllib.loads(doc.snippet("containerd-cri"))
    plugins, log = _containerd_loads(config)
    assert _cri_status(plugins) == "ok", f"{plugins}\n{log[-3000:]}"
    # The doc's reason for the runc entry: without it, containerd 1.6 drops its CRI plugin.
    del config["plugins"][CRI]["containerd"]["runtimes"]["runc"]
    plugins, log = _containerd_loads(config)
    assert _cri_status(plugins) == "error", plugins
    assert "no corresponding runtime configured in `containerd.runtimes`" in log


@pytest.mark.clients
def test_containerd_legacy_snippet_needs_version_1():
    text = doc.snippet("containerd-untrusted-v1")
    plugins, log = _containerd_loads(tomllib.loads(text))
    assert _cri_status(plugins) == "ok", f"{plugins}\n{log[-3000:]}"
    assert "`untrusted_workload_runtime` is deprecated" in log
    # In a version 2 file the very same section stops containerd, as the doc says.
    assert "version = 1" in text
    plugins, log = _containerd_loads(text.replace("version = 1", "version = 2"))
    assert not plugins
    assert 'invalid plugin key URI "cri" expect io.containerd.x.vx' in log


# ---------------------------------------------------------------- CRI-O: the documented schema

# [crio.runtime] and [crio.runtime.runtimes.NAME] keys, from crio.conf(5), with their types.
CRIO_RUNTIME_KEYS = {"drop_infra_ctr": bool, "conmon_env": list, "conmon": str, "conmon_cgroup": str,
                     "default_runtime": str, "runtimes": dict, "default_ulimits": list, "log_level": str}
CRIO_HANDLER_KEYS = {"runtime_path": str, "runtime_type": str, "runtime_root": str, "runtime_config_path": str,
                     "privileged_without_host_devices": bool, "allowed_annotations": list, "monitor_path": str,
                     "monitor_cgroup": str, "monitor_env": list, "monitor_exec_cgroup": str,
                     "inherit_default_runtime": bool, "container_min_memory": str, "platform_runtime_paths": dict,
                     "no_sync_log": bool, "default_annotations": dict, "stream_websockets": bool,
                     "seccomp_profile": str, "container_create_timeout": int}


def test_crio_dropin_has_crio_keys_and_the_documented_values():
    """CRI-O is not packaged for Debian 12: the drop-in is checked against CRI-O's documented
    schema (crio.conf(5); see the module docstring), not run."""
    config = tomllib.loads(doc.snippet("crio-dropin"))
    assert set(config) == {"crio"} and set(config["crio"]) == {"runtime"}, config
    runtime = config["crio"]["runtime"]
    for key, value in runtime.items():
        assert key in CRIO_RUNTIME_KEYS, f"[crio.runtime] {key}: not a key of crio.conf(5)"
        assert isinstance(value, CRIO_RUNTIME_KEYS[key]), f"[crio.runtime] {key} = {value!r}"
    for name, handler in runtime["runtimes"].items():
        for key, value in handler.items():
            assert key in CRIO_HANDLER_KEYS, f"[crio.runtime.runtimes.{name}] {key}: not a key of crio.conf(5)"
            assert isinstance(value, CRIO_HANDLER_KEYS[key]), f"[crio.runtime.runtimes.{name}] {key} = {value!r}"
    # What the doc says each is for.
    assert runtime["drop_infra_ctr"] is False  # every pod gets the infra container that owns its guest
    env = dict(item.split("=", 1) for item in runtime["conmon_env"])
    assert env.get("VMRUN_CONFIG") == doc.VMRUN_CONFIG and "/usr/local/bin" in env.get("PATH", "").split(":")
    handler = runtime["runtimes"]["vmrun"]
    assert handler == {"runtime_path": doc.VMRUN_BINARY, "runtime_type": "oci", "runtime_root": doc.VMRUN_ROOT,
                       "privileged_without_host_devices": True}


@pytest.mark.skipif(not shutil.which("crio"), reason="CRI-O is not installed (Debian 12 does not package it)")
def test_crio_loads_the_dropin(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-vmrun.conf").write_text(doc.snippet("crio-dropin"))
    result = subprocess.run(["crio", "--config", "/dev/null", "--config-dir", str(tmp_path / "conf.d"), "config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"(?m)^\s*drop_infra_ctr = false", result.stdout), result.stdout
    assert re.search(r'(?m)^\s*\[crio\.runtime\.runtimes\.vmrun\]', result.stdout), result.stdout


# ---------------------------------------------------------------- Kubernetes RuntimeClass


def _quantity(value) -> float:
    """A Kubernetes quantity: memory in MiB, cpu in millicores."""
    text = str(value)
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "k": 1000 / 2**20, "M": 10**6 / 2**20, "G": 10**9 / 2**20}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    if text.endswith("m"):
        return float(text[:-1])
    return float(text) * 1000  # plain cpu cores


def test_runtimeclass_handler_and_overhead():
    yaml = pytest.importorskip("yaml")  # PyYAML: python3-yaml
    documents = list(yaml.safe_load_all(doc.snippet("kubernetes-runtimeclass")))
    runtime_class = next(d for d in documents if d["kind"] == "RuntimeClass")
    pod = next(d for d in documents if d["kind"] == "Pod")
    assert runtime_class["apiVersion"] == "node.k8s.io/v1"
    assert pod["spec"]["runtimeClassName"] == runtime_class["metadata"]["name"]
    # The handler is the runtime the containerd and CRI-O snippets define (and test_cri uses).
    from cri_env import RUNTIME_HANDLER

    handler = runtime_class["handler"]
    assert handler == RUNTIME_HANDLER
    assert handler in tomllib.loads(doc.snippet("containerd-cri"))["plugins"][CRI]["containerd"]["runtimes"]
    assert handler in tomllib.loads(doc.snippet("containerd-shimv2"))["plugins"][CRI]["containerd"]["runtimes"]
    assert handler in tomllib.loads(doc.snippet("crio-dropin"))["crio"]["runtime"]["runtimes"]
    # The overhead: the measured per-pod cost, rounded up (by at most half as much again).
    fixed = runtime_class["overhead"]["podFixed"]
    assert set(fixed) == {"memory", "cpu"}, fixed
    memory = doc.memory_figure("pod-memavailable-mib")
    cpu = doc.memory_figure("pod-idle-cpu-millicores")
    assert memory <= _quantity(fixed["memory"]) <= memory * 1.5, (fixed, memory)
    assert cpu <= _quantity(fixed["cpu"]) <= max(cpu * 1.5, cpu + 50), (fixed, cpu)
    # The doc's prose cites the same figures.
    text = doc.CALLERS_MD.read_text()
    assert f"{memory:.0f} MiB" in text and f"{cpu:.0f} millicores" in text


# ---------------------------------------------------------------- podman


@pytest.mark.integration
@pytest.mark.clients
def test_podman_runs_with_the_documented_containers_conf(guest_image, vm_templates_dir):
    from podman_env import IMAGE, RUN_FLAGS, VMRUN_BINARY, PodmanEnv

    for tool in ("podman", "conmon"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/usr/bin", "/usr/local/bin")):
            pytest.fail(f"{tool} is not installed: run scripts/setup.sh")
    if not VMRUN_BINARY.exists():
        pytest.fail(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh does)")
    env = PodmanEnv(vm_templates_dir)
    # The env's containers.conf, replaced by the doc's (the runtime: the env's wrapper that
    # adds only vmrun's --root; VMRUN_CONFIG: the env's); the env's own keys (storage, tmp
    # dir, events, cgroup manager) stay where the doc sets nothing.
    conf = env.base / "containers.conf"
    documented = tomllib.loads(doc.for_host(doc.snippet("podman-containers-conf"),
                                            {doc.VMRUN_BINARY: env.runtime, doc.VMRUN_CONFIG: env.vmrun_config}))
    conf.write_text(tomli_w.dumps(doc.add_keys(documented, tomllib.loads(conf.read_text()), keep_doc=True)))
    with _started(env, env.load_image) as podman:
        path = podman("info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Path}}", timeout=60)
        assert path.stdout.split() == ["vmrun", str(env.runtime)], podman.explain(path)
        result = podman("run", "--rm", *RUN_FLAGS, IMAGE, "sh", "-c", "uname -r; grep -c QEMU /proc/cpuinfo")
        assert result.returncode == 0, podman.explain(result)
        kernel, qemu_cpus = result.stdout.split()[:2]
        assert kernel != HOST_KERNEL and int(qemu_cpus) > 0, podman.explain(result)
        problems = podman.leftovers()
        assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- docker


@pytest.mark.integration
@pytest.mark.clients
def test_docker_runs_with_the_documented_daemon_json(guest_image, vm_templates_dir):
    from docker_env import IMAGE, RUN_FLAGS, DockerEnv, DockerSetupError
    from podman_env import VMRUN_BINARY

    if not VMRUN_BINARY.exists():
        pytest.fail(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh does)")
    base = Path(tempfile.mkdtemp(prefix="vdocdk", dir="/tmp"))
    try:
        # The documented binary path, made the test's: a link of its own, so that dockerd
        # reporting it proves the runtime came from this file, not from the env's --add-runtime.
        (base / "bin").mkdir()
        (base / "bin" / "vmrun").symlink_to(VMRUN_BINARY)
        daemon_json = doc.for_host(doc.snippet("docker-daemon-json"), {doc.VMRUN_BINARY: base / "bin/vmrun"})
        try:
            env = DockerEnv(vm_templates_dir, daemon_json=daemon_json)
        except DockerSetupError as exc:
            pytest.skip(f"dockerd unavailable: {exc}")
        with _started(env, env.start, env.load_image) as docker:
            info = docker("info", "--format", "{{json .Runtimes}}", timeout=60)
            assert json.loads(info.stdout)["vmrun"]["path"] == str(base / "bin/vmrun"), docker.explain(info)
            result = docker("run", "--rm", *RUN_FLAGS, IMAGE, "sh", "-c", "uname -r; grep -c QEMU /proc/cpuinfo")
            assert result.returncode == 0, docker.explain(result)
            kernel, qemu_cpus = result.stdout.split()[:2]
            assert kernel != HOST_KERNEL and int(qemu_cpus) > 0, docker.explain(result)
            problems = docker.leftovers()
            assert not problems, "\n".join(problems)
    finally:
        shutil.rmtree(base, ignore_errors=True)
