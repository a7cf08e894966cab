"""A private containerd that drives vmrun as its runtime, for tests with real clients.

The `containerd` fixture (session) starts `containerd` with everything it owns under one
short temporary directory: root, state, sockets, the snapshots, and vmrun's run dir and
state root (VMRUN_CONFIG is in containerd's environment, so its shims and every vmrun call
inherit it). containerd still puts a few things under /run/containerd whatever its config
says (the shim sockets `s/<sha256>`, ctr's IO fifos `fifo/<n>/`, `runc/<ns>`): the fixture
removes those the tests made, and only those (they are told apart by the session's id
prefix and namespaces).

At the end it stops containerd and asserts nothing is left: no process naming the private
dirs or carrying their VMRUN_CONFIG (QEMU, vmrun's sandbox daemons and shims,
containerd-shim-runc-v2), no mount under them, vmrun's run_dir/vm and state root empty.

`ctd.namespace(name)` gives a `ctr` bound to a namespace, with the busybox images imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ctrlib, images: plain modules beside us

from ctrlib import (  # noqa: E402
    CONTAINERD_RUN, PAUSE_IMAGE, VMRUN, Containerd, Ctr, _entries, images, mounts_under, wait_for,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "clients: drives vmrun through real clients (containerd + ctr)")


# ---- fixtures ----

def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("containerd tests need root")
    missing = [tool for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "script") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (run scripts/setup.sh)")
    if not VMRUN.is_file():
        pytest.fail(f"{VMRUN} not found: run `pip install -e .` (scripts/setup.sh does)")
    if not images.BUSYBOX.is_file():
        pytest.fail(f"{images.BUSYBOX} not found: install busybox-static (scripts/setup.sh does)")


def _write_config(base: Path, templates_dir: Path) -> Path:
    (base / "vmrun.toml").write_text(f'run_dir = "{base / "run"}"\nboot_timeout = 120\n'
                                     f'templates_dir = "{templates_dir}"\n')
    (base / "cni").mkdir()
    config = base / "containerd.toml"
    config.write_text(f"""\
version = 2
root = "{base}/root"
state = "{base}/state"
oom_score = 0

[grpc]
  address = "{base}/c.sock"
[ttrpc]
  address = "{base}/t.sock"
[debug]
  address = "{base}/d.sock"
  level = "debug"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # This host lacks CAP_SYS_RESOURCE: no oom_score_adj below containerd's own.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/cni"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "vmrun"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrun]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrun.options]
          BinaryName = "{VMRUN}"
          Root = "{base}/vroot"
""")
    return config


def containerd_env(vmrun_config: Path) -> dict[str, str]:
    """containerd's environment: vmrun's config, and containerd-shim-vmrun-v2 (the console
    script beside this interpreter) on its PATH, where containerd looks for shims."""
    return {**os.environ, "VMRUN_CONFIG": str(vmrun_config),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _clean_containerd_run(ctd: Containerd, namespaces_before: set[str]) -> list[str]:
    """Remove what the session left under /run/containerd; what there was to remove."""
    removed = []
    for namespace, container_id in sorted(ctd.ids):
        socket = ctd.shim_socket(namespace, container_id)
        if socket.exists() or socket.is_symlink():
            socket.unlink()
            removed.append(str(socket))
    for directory in ctd.our_fifo_dirs():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(str(directory))
    for namespace in ctd.namespaces:
        directory = CONTAINERD_RUN / "runc" / namespace
        if namespace not in namespaces_before and directory.is_dir():
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: anything inside would not be ours to judge
    return removed


@pytest.fixture(scope="session")
def containerd(request, guest_image, vm_templates_dir):
    _require_tools()
    # Short: unix socket paths (containerd's, vmrun's under run/vm/<hash>/) must fit 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    config = _write_config(base, vm_templates_dir)
    images_dir = base / "images"
    images_dir.mkdir()
    layer = images.layer_tar()
    images.write_archives("bbx:latest", images_dir / "bbx-oci.tar", images_dir / "bbx-docker.tar", layer=layer)
    images.write_archives("pause:1", images_dir / "pause-oci.tar", images_dir / "pause-docker.tar",
                          images.PAUSE_CMD, layer=layer)
    runc_namespaces_before = set(_entries(CONTAINERD_RUN / "runc"))

    log = open(base / "containerd.log", "ab")
    process = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env=containerd_env(base / "vmrun.toml"),
                               start_new_session=True)
    log.close()
    # containerd allows no doubled separators in ids, so the prefix is plain hex, not the tmp dir's name.
    ctd = Containerd(base, process, prefix=f"vc{secrets.token_hex(4)}")
    try:
        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"containerd exited ({process.returncode}):\n{ctd.log_tail()}")
            return subprocess.run(["ctr", "--address", ctd.address, "version"], capture_output=True,
                                  timeout=10).returncode == 0

        wait_for(answers, timeout=30, message="containerd answering")
    except BaseException:
        _stop(process)
        shutil.rmtree(base, ignore_errors=True)
        raise

    yield ctd

    # Whatever the tests did not remove goes first: a running container would keep its guest.
    not_removed = {}
    for namespace in ctd.namespaces:
        with contextlib.suppress(Exception):
            if left := Ctr(ctd, namespace).remove_all():
                not_removed[namespace] = left
    _stop(process)
    found = ctd.wait_settled(timeout=20)
    for line in found["processes"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    for point in sorted(found["mounts"], key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    removed_outside = _clean_containerd_run(ctd, runc_namespaces_before)
    problems = {k: v for k, v in found.items() if v and k not in ("fifo dirs", "shim sockets")}
    kept_log = Path(tempfile.gettempdir()) / f"vmrun-clients-{base.name}-containerd.log"
    if problems:
        with contextlib.suppress(OSError):
            shutil.copyfile(ctd.log, kept_log)
    # After a failed test, the logs of the sandboxes that failed (its error names them under
    # the private dir, which goes now): kept beside containerd's, with its log.
    failed = ctd.run_dir / "failed"
    if request.session.testsfailed and failed.is_dir() and any(failed.iterdir()):
        kept_failed = Path(tempfile.gettempdir()) / f"vmrun-clients-{base.name}-failed"
        with contextlib.suppress(OSError):
            shutil.copytree(failed, kept_failed, dirs_exist_ok=True)
            shutil.copyfile(ctd.log, kept_log)
        print(f"\nfailed sandboxes' logs: {kept_failed}, containerd's log: {kept_log}", file=sys.stderr)
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)
    assert not problems, (f"left behind after containerd stopped: {json.dumps(problems, indent=1)}\n"
                          f"containerd's log: {kept_log}")
    if not_removed:
        print(f"\ncontainers the tests did not remove (the fixture did): {not_removed}", file=sys.stderr)
    if removed_outside:
        print(f"\nremoved from /run/containerd: {removed_outside}", file=sys.stderr)


# ---- docker and podman, one private daemon (or podman configuration) per test module ----

@pytest.fixture(scope="module")
def docker_session(guest_image, vm_templates_dir):
    """dockerd with vmrun (docker_env.py), started for the module, stopped after it."""
    from docker_env import DockerEnv, DockerSetupError
    from leftovers import client_session
    from podman_env import VMRUN_BINARY

    if not VMRUN_BINARY.exists():
        pytest.fail(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh does)")
    try:
        env = DockerEnv(vm_templates_dir)
    except DockerSetupError as exc:  # no archive to download docker.io from, and no cached copy
        pytest.skip(f"dockerd unavailable: {exc}")
    yield from client_session(env, env.start, env.load_image)


@pytest.fixture
def docker(docker_session):
    """docker_session, checked after each test: nothing of it left behind."""
    yield docker_session
    problems = docker_session.leftovers()
    assert not problems, "left behind:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def podman_session(request, guest_image, vm_templates_dir):
    """podman with vmrun (podman_env.py) for the module; in a network namespace of its own
    where the module says PODMAN_OWN_NETNS = True (its default network's bridge and rules)."""
    from leftovers import client_session
    from podman_env import VMRUN_BINARY, PodmanEnv

    for tool in ("podman", "conmon"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/usr/bin", "/usr/local/bin")):
            pytest.fail(f"{tool} is not installed: run scripts/setup.sh")
    if not VMRUN_BINARY.exists():
        pytest.fail(f"{VMRUN_BINARY} missing: pip install -e . (scripts/setup.sh does)")
    env = PodmanEnv(vm_templates_dir)
    steps = [env.make_netns] if getattr(request.module, "PODMAN_OWN_NETNS", False) else []
    yield from client_session(env, *steps, env.load_image)


@pytest.fixture
def podman(podman_session):
    """podman_session, checked after each test: nothing of it left behind."""
    yield podman_session
    problems = podman_session.leftovers()
    assert not problems, "left behind:\n" + "\n".join(problems)
