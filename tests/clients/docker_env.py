"""dockerd (Debian's docker.io, extracted, never installed) on a private containerd, driving vmrun.

- dockerd and the docker CLI come from Debian's `docker.io` package, fetched with
  `apt-get download` and unpacked with `dpkg-deb -x` into a cache outside the repository
  (/var/cache/vmrun-tests/docker.io/<version>, or under $VMRUN_TEST_CACHE), reused when
  present. Installing the package would register services and groups; unpacking does not.
- A private containerd (no CRI plugin) and dockerd run in a network namespace the test
  creates and removes (`nsenter --net`, so they share the host's mount namespace: the
  shims and vmrun must see the rootfs dockerd mounts). dockerd runs with `--bridge none
  --iptables=false ...` and containers with `--network none`.
- dockerd knows vmrun as `--add-runtime vmrun=<vmrun>`: containerd's runc v2 shim calls it
  with runc's command line (`--root <exec-root>/runtime-runc/moby --log ... --log-format
  json create --bundle ...`). The shims inherit containerd's environment, so VMRUN_CONFIG
  (a private run_dir) is set on containerd.

Everything but the shims' sockets (/run/containerd/s/<hash>, fixed by containerd, removed
by the shims) and dockerd's /run/docker/plugins (removed if it made it) lies under
`DockerEnv.base`. `leftovers()` lists containers, processes mentioning the base
directory (command line or environment), mounts, vmrun state and sandbox dirs;
`close()` also stops both daemons and removes the network namespace.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from images import write_archives
from podman_env import (BOOT_TIMEOUT, VMRUN_BINARY, dir_entries, kill_processes, mounts_under,
                        processes_mentioning, unmount_all_under, vmrun_debug, wait_for_no_processes)

CACHE_ROOT = Path(os.environ.get("VMRUN_TEST_CACHE", "/var/cache/vmrun-tests"))
IMAGE = "bbx:latest"
RUN_FLAGS = ("--runtime", "vmrun", "--network", "none")
MOBY_NAMESPACE = "moby"  # dockerd's containerd namespace
RUN_DOCKER = Path("/run/docker")  # dockerd makes /run/docker/plugins whatever its exec root


class DockerSetupError(RuntimeError):
    """dockerd could not be fetched or started (not vmrun's doing)."""


def _run(argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise DockerSetupError(f"$ {' '.join(argv)}: rc {result.returncode}\n{result.stdout[-2000:]}"
                               f"{result.stderr[-2000:]}")
    return result


def _candidate_version() -> str:
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", "docker.io"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")), "")


def docker_root() -> Path:
    """The unpacked docker.io package (usr/sbin/dockerd, usr/bin/docker), downloaded once."""
    cache = CACHE_ROOT / "docker.io"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs download once
        version = _candidate_version()
        if version:
            wanted = cache / version.replace(":", "_")
            if (wanted / "root" / "usr" / "sbin" / "dockerd").is_file():
                return wanted / "root"
        else:  # apt knows no docker.io (no lists): any copy unpacked before will do
            found = sorted(cache.glob("*/root/usr/sbin/dockerd"))
            if found:
                return found[-1].parents[2]
            raise DockerSetupError("apt knows no docker.io package (run apt-get update) and none is cached "
                                   f"in {cache}")
        shutil.rmtree(wanted, ignore_errors=True)  # an earlier run that did not finish
        staging = Path(tempfile.mkdtemp(prefix="download-", dir=cache))
        try:
            try:
                _run(["apt-get", "download", f"docker.io={version}"], cwd=staging, timeout=600)
            except DockerSetupError:
                found = sorted(cache.glob("*/root/usr/sbin/dockerd"))
                if found:  # offline: an older copy unpacked before will do
                    return found[-1].parents[2]
                raise
            debs = list(staging.glob("docker.io_*.deb"))
            if len(debs) != 1:
                raise DockerSetupError(f"apt-get download docker.io left {debs}")
            _run(["dpkg-deb", "-x", str(debs[0]), str(staging / "root")])
            debs[0].unlink()
            staging.rename(wanted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return wanted / "root"


class _Daemon:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def tail(self, chars: int = 4000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log ({self.log}), last {chars} chars\n" + text[-chars:]

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM, then SIGKILL after `timeout`; a line saying so if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"{self.name} did not stop within {timeout}s of SIGTERM: killed"
        return ""


class DockerEnv:
    """A private containerd + dockerd in a network namespace of their own."""

    def __init__(self, templates_dir: Path, daemon_json: str | None = None) -> None:
        """`daemon_json`: dockerd's configuration file (docs/callers.md's); it then names
        the vmrun runtime itself (no --add-runtime, which would conflict with it)."""
        self.daemon_json = daemon_json
        self.root = docker_root()
        self.dockerd = self.root / "usr" / "sbin" / "dockerd"
        self.docker = self.root / "usr" / "bin" / "docker"
        # Short: unix sockets (containerd's, dockerd's, vmrun's) live under it.
        self.base = Path(tempfile.mkdtemp(prefix="vdk-", dir="/tmp"))
        self.netns = f"vmrun-dk-{secrets.token_hex(4)}"
        self.ctd_dir = self.base / "ctd"
        self.ctd_socket = self.ctd_dir / "c.sock"
        self.exec_root = self.base / "x"
        self.data_root = self.base / "data"
        self.socket = self.base / "d.sock"
        self.run_dir = self.base / "run"  # vmrun's run_dir
        self.vmrun_config = self.base / "vmrun.toml"
        self.images = self.base / "images"
        for path in (self.ctd_dir, self.images, self.base / "cli"):
            path.mkdir(parents=True)
        self.vmrun_config.write_text(f'run_dir = "{self.run_dir}"\nboot_timeout = 120\n'
                                     f'templates_dir = "{templates_dir}"\n')
        self.containerd: _Daemon | None = None
        self.daemon: _Daemon | None = None
        self.netns_made = False
        self.made_run_docker = False
        self.cli_env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.base / "cli")}

    @property
    def state(self) -> Path:
        """vmrun's --root, as dockerd names it (runtime-runc even for other runtimes)."""
        return self.exec_root / "runtime-runc" / MOBY_NAMESPACE

    # -------- start

    def start(self) -> None:
        self.made_run_docker = not RUN_DOCKER.exists()
        _run(["ip", "netns", "add", self.netns], timeout=30)
        self.netns_made = True
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"], timeout=30)
        enter = ["nsenter", f"--net=/run/netns/{self.netns}", "--"]
        (self.ctd_dir / "config.toml").write_text(f"""\
version = 2
root = "{self.ctd_dir / 'root'}"
state = "{self.ctd_dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.ctd_socket}"
[ttrpc]
  address = "{self.ctd_dir / 't.sock'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.ctd_dir / 'opt'}"
""")
        daemon_env = {**os.environ, "VMRUN_CONFIG": str(self.vmrun_config)}
        self.containerd = _Daemon("containerd", [*enter, "containerd", "--config", str(self.ctd_dir / "config.toml")],
                                  self.base / "containerd.log", daemon_env)
        self._wait_for(self.containerd, lambda: self.ctd_socket.exists(), 60)
        (self.base / "daemon.json").write_text(self.daemon_json or "{}\n")
        add_runtime = () if self.daemon_json else ("--add-runtime", f"vmrun={VMRUN_BINARY}")
        self.daemon = _Daemon("dockerd", [
            *enter, str(self.dockerd), "--config-file", str(self.base / "daemon.json"),
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "dockerd.pid"), "-H", f"unix://{self.socket}",
            "--containerd", str(self.ctd_socket), "--containerd-namespace", MOBY_NAMESPACE,
            "--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--userland-proxy=false", "--storage-driver", "overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs",
            *add_runtime,
        ], self.base / "dockerd.log", {**daemon_env, "PATH": f"{self.root / 'usr/bin'}:{os.environ.get('PATH', '')}"})
        self._wait_for(self.daemon, lambda: self("version", timeout=30).returncode == 0, 120)

    def _wait_for(self, daemon: _Daemon, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if daemon.proc.poll() is not None:
                raise DockerSetupError(f"{daemon.name} exited with {daemon.proc.returncode}\n{daemon.tail()}")
            if time.monotonic() > deadline:
                raise DockerSetupError(f"{daemon.name} not ready within {timeout}s\n{daemon.tail()}")
            time.sleep(0.2)

    def load_image(self) -> None:
        archive = self.images / "bbx-docker.tar"
        write_archives(IMAGE, None, archive)
        self("load", "-i", str(archive), timeout=120, check=True)

    # -------- commands

    def __call__(self, *args: str, timeout: float = BOOT_TIMEOUT, check: bool = False,
                 input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.docker), *args], capture_output=True, text=True, timeout=timeout,
                                env=self.cli_env, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(self.explain(result))
        return result

    def explain(self, result: subprocess.CompletedProcess) -> str:
        return (f"$ docker {' '.join(result.args[1:])}\nrc {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\n" + vmrun_debug(self.state, self.run_dir)
                + (self.daemon.tail(3000) if self.daemon else ""))

    # -------- leftovers

    def container_ids(self) -> list[str]:
        result = self("ps", "-aq", timeout=60)
        return result.stdout.split() if result.returncode == 0 else [f"(docker ps failed: {result.stderr})"]

    def leftovers(self, wait: float = 20.0) -> list[str]:
        problems = []
        containers = self.container_ids()
        if containers:
            problems.append(f"docker containers left: {containers}")
            self("rm", "--force", *containers, timeout=120)
        deadline = time.monotonic() + wait
        while dir_entries(self.state) and time.monotonic() < deadline:
            time.sleep(0.2)
        states = dir_entries(self.state)
        if states:
            problems.append(f"vmrun state left in {self.state}: {states}\n" + vmrun_debug(self.state, self.run_dir))
            for container_id in states:
                subprocess.run([str(VMRUN_BINARY), "--root", str(self.state), "delete", "--force", container_id],
                               capture_output=True, timeout=120,
                               env={**os.environ, "VMRUN_CONFIG": str(self.vmrun_config)})
        # Only the two daemons may still mention the base directory (nsenter execs them).
        daemons = {d.proc.pid for d in (self.containerd, self.daemon) if d and d.proc.poll() is None}
        deadline = time.monotonic() + wait
        while True:
            extra = [line for line in processes_mentioning(str(self.base))
                     if int(line.split(":", 1)[0]) not in daemons]
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if extra:
            problems.append(f"processes left: {extra}")
            kill_processes(extra)
        vm_dirs = dir_entries(self.run_dir / "vm")
        if vm_dirs:
            problems.append(f"sandbox dirs left in {self.run_dir / 'vm'}: {vm_dirs}")
        netns = dir_entries(self.run_dir / "netns")  # vmrun's, for a new netns without a path
        if netns:
            problems.append(f"vmrun's container netns left in {self.run_dir / 'netns'}: {netns}")
        # While dockerd runs, its data root stays bind-mounted on itself (private propagation).
        mounts = [m for m in mounts_under(self.base) if m != str(self.data_root)]
        if mounts:
            problems.append(f"mounts left: {mounts}")
        return problems

    def close(self) -> list[str]:
        problems = []
        if self.daemon:
            problems += self.leftovers()
        for daemon in (self.daemon, self.containerd):
            if daemon:
                line = daemon.stop()
                if line:
                    problems.append(line + "\n" + daemon.tail())
        left = wait_for_no_processes(str(self.base), 20)
        if left:
            problems.append(f"processes left after the daemons stopped: {left}")
            kill_processes(left)
        mounts = mounts_under(self.base)
        if mounts:
            problems.append(f"mounts left after the daemons stopped: {mounts}")
            unmount_all_under(self.base)
        if self.netns_made:
            result = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                problems.append(f"ip netns del {self.netns}: {result.stderr}")
        if self.made_run_docker:  # dockerd's fixed plugin socket dir, if we made it
            for path in (RUN_DOCKER / "plugins", RUN_DOCKER):
                try:
                    path.rmdir()
                except OSError:
                    pass
        if not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        return problems
