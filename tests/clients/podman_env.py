"""podman + conmon driving vmrun, with everything they own under one private directory.

How podman calls a runtime here (see /work/shared/notes/real-clients.md, section 3), and
what that means for a private setup:

- conmon runs `create` and every `exec`; podman itself runs `start`, `kill` and `delete`,
  and so does conmon's exit command (`podman container cleanup`, after the container exits).
- podman gives the runtime almost no environment: conmon gets only the variables of
  containers.conf's `conmon_env_vars` (plus a few of its own), and podman's own runtime
  calls get `XDG_RUNTIME_DIR` and at most PATH. So VMRUN_CONFIG reaches `create` and
  `exec` through `conmon_env_vars`; `start`, `kill` and `delete` run with vmrun's default
  configuration and must work from the state alone (as they would in a real deployment).
- `--runtime-flag root=DIR` reaches conmon and podman's calls, but not the cleanup
  process that conmon starts: its `delete --force` would go to vmrun's default --root,
  find nothing, and the guest would stay up. So the runtime podman knows as "vmrun" is a
  two-line script that runs the real vmrun with `--root` set, nothing else.
- The machine lacks CAP_SYS_RESOURCE: podman's default rlimits (1048576) cannot be set,
  so every `run` passes `--ulimit nofile=1024:1024 --ulimit nproc=4096:4096`.
- crun (podman's default runtime) does not work here: `--runtime vmrun` always.

Storage (overlay, without the private bind mount of its home), run root, tmp dir (conmon's
exit files, file locks instead of /dev/shm/libpod_lock), events file, CNI config dir,
vmrun's state and run_dir: all under `PodmanEnv.base`. `leftovers()` lists what a test
left behind: containers, processes mentioning the base directory (in their command line
or their environment), mounts, vmrun state and sandbox dirs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from images import write_archives
from leftovers import mounts_under, processes_mentioning

VMRUN_BINARY = Path(sys.executable).parent / "vmrun"
IMAGE = "localhost/bbx:latest"  # what `podman load` names the docker-archive's "bbx:latest"
# What podman needs here on top of its defaults (see the module docstring).
RUN_FLAGS = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
BOOT_TIMEOUT = 240  # seconds for a command that boots a guest: TCG on a loaded 2-core host
# What podman's default network (CNI here, podman 4.3) leaves outside the private directory:
# host-local's IPAM store for the network "podman" (its lock and last-reserved files stay
# after the last DEL), and the network namespaces podman makes for its containers.
CNI_IPAM_DIR = Path("/var/lib/cni/networks/podman")
NETNS_DIR = Path("/run/netns")


# ---------------------------------------------------------------- leftovers (also docker_env)


def wait_for_no_processes(text: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (found := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def kill_processes(lines: list[str]) -> None:
    for line in lines:
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def unmount_all_under(path: str | Path) -> None:
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def dir_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def vm_dirs_in_state(state_root: Path) -> dict[str, str]:
    """Container id -> the sandbox dir vmrun's state names for it."""
    found = {}
    for state in state_root.glob("*/state.json"):
        try:
            found[state.parent.name] = json.loads(state.read_text()).get("vm_dir", "")
        except (OSError, ValueError):
            continue
    return found


def vmrun_debug(state_root: Path, run_dir: Path) -> str:
    """vmrun's side after a failure: its state files and the guests' console/daemon logs."""
    parts = []
    for state in sorted(state_root.glob("*/state.json")):
        parts.append(f"--- {state}\n{state.read_text()[:2000]}")
    for log in sorted(run_dir.glob("vm/*/*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {log} (last 3000 chars)\n{text[-3000:]}")
    return "\n".join(parts)


def conmon_term_sockets() -> set[Path]:
    """conmon's --console-socket listeners: always in /tmp; left there if the runtime fails
    before connecting (conmon's doing, seen with a fake runtime failing `exec -t` too)."""
    return set(Path("/tmp").glob("conmon-term.*"))


# ---------------------------------------------------------------- a terminal to drive podman -t


def set_window_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class Terminal:
    """A pty whose slave is the controlling terminal of `argv` (via setsid --ctty).

    `resize()` sets the window size on the master, as a terminal emulator does: the kernel
    sends SIGWINCH to the foreground process group, i.e. to podman.
    """

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, columns: int) -> None:
        self.master, slave = os.openpty()
        set_window_size(slave, rows, columns)
        self.output = b""
        try:
            self.proc = subprocess.Popen(["setsid", "--wait", "--ctty", *argv], stdin=slave, stdout=slave,
                                         stderr=slave, env=env, close_fds=True)
        finally:
            os.close(slave)

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the other side is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every slave fd is closed
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: str, timeout: float) -> re.Match:
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not self._read(min(remaining, 0.5)) and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} not seen within {timeout:.0f}s (exit status "
                                     f"{self.proc.poll()}); the terminal showed:\n{self.text()}")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, columns: int) -> None:
        set_window_size(self.master, rows, columns)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0.05):  # what is left in the pty
            pass
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


# ---------------------------------------------------------------- the environment


class PodmanEnv:
    """podman with private storage and configuration, its runtime "vmrun" = our vmrun."""

    def __init__(self, templates_dir: Path) -> None:
        # After make_netns(), podman (and so conmon, the CNI plugins, their bridge and
        # iptables rules) runs in a network namespace of its own, removed by close().
        self.netns = ""
        self.netns_made = False
        self.made_ipam_dir: Path | None = None
        self.netns_before: set[str] = set()
        # Short: vmrun's unix sockets live under run_dir.
        self.base = Path(tempfile.mkdtemp(prefix="vpm-", dir="/tmp"))
        self.run_dir = self.base / "run"  # vmrun's run_dir
        self.state = self.base / "state"  # vmrun's --root
        self.graphroot = self.base / "storage"
        self.runroot = self.base / "runroot"
        self.tmpdir = self.base / "tmp"
        self.cni_dir = self.base / "cni"
        self.events = self.base / "events.log"
        self.vmrun_config = self.base / "vmrun.toml"
        self.runtime = self.base / "vmrun-runtime"
        self.images = self.base / "images"
        for path in (self.tmpdir, self.cni_dir, self.images):
            path.mkdir(parents=True)
        self.vmrun_config.write_text(f'run_dir = "{self.run_dir}"\nboot_timeout = 120\n'
                                     f'templates_dir = "{templates_dir}"\n')
        self.runtime.write_text(
            "#!/bin/sh\n"
            "# podman's cleanup process drops --runtime-flag: set vmrun's --root for every call.\n"
            f"exec '{VMRUN_BINARY}' --root '{self.state}' \"$@\"\n")
        self.runtime.chmod(0o755)
        conmon_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        (self.base / "containers.conf").write_text(f"""\
[containers]
log_driver = "k8s-file"
# As Debian's /usr/share/containers/containers.conf, which CONTAINERS_CONF replaces.
default_sysctls = ["net.ipv4.ping_group_range=0 0"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.events}"
image_copy_tmp_dir = "{self.tmpdir}"
lock_type = "file"
runtime = "vmrun"
tmp_dir = "{self.tmpdir}"
conmon_env_vars = ["PATH={conmon_path}", "VMRUN_CONFIG={self.vmrun_config}"]
[engine.runtimes]
vmrun = ["{self.runtime}"]
[network]
network_config_dir = "{self.cni_dir}"
""")
        (self.base / "storage.conf").write_text(f"""\
[storage]
driver = "overlay"
graphroot = "{self.graphroot}"
runroot = "{self.runroot}"
[storage.options.overlay]
skip_mount_home = "true"
""")
        (self.base / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "VMRUN_CONFIG"},
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.base / "registries.conf"),
            "TMPDIR": str(self.tmpdir),
        }

    def make_netns(self) -> None:
        """A network namespace for podman to run in from now on, lo up (removed by close())."""
        # The topmost of host-local's dirs that is not there yet: close() removes it.
        self.made_ipam_dir = next((d for d in (CNI_IPAM_DIR.parent, CNI_IPAM_DIR) if not d.exists()), None)
        self.netns_before = set(dir_entries(NETNS_DIR))
        self.netns = f"vmrun-pm-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True, timeout=30)
        self.netns_made = True
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=30)

    def podman_netns_left(self) -> list[str]:
        """Network namespaces podman made (/run/netns/netns-*) since make_netns, still there."""
        return sorted(name for name in set(dir_entries(NETNS_DIR)) - self.netns_before
                      if name.startswith("netns-"))

    # -------- commands

    def argv(self, *args: str) -> list[str]:
        enter = ["nsenter", f"--net={NETNS_DIR / self.netns}", "--"] if self.netns else []
        return [*enter, "podman", "--runtime", "vmrun", "--root", str(self.graphroot), "--runroot", str(self.runroot),
                "--tmpdir", str(self.tmpdir), "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                "--storage-driver", "overlay", "--network-config-dir", str(self.cni_dir), *args]

    def __call__(self, *args: str, timeout: float = BOOT_TIMEOUT, check: bool = False,
                 input: str | None = None) -> subprocess.CompletedProcess:
        """Run podman, capturing its output (text); with check, fail loudly on rc != 0."""
        argv = self.argv(*args)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(self.explain(result))
        return result

    def explain(self, result: subprocess.CompletedProcess) -> str:
        args = result.args[len(self.argv()):] if isinstance(result.args, list) else [str(result.args)]
        return (f"$ podman ... {' '.join(args)}\nrc {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                + vmrun_debug(self.state, self.run_dir))

    def load_image(self) -> None:
        archive = self.images / "bbx-docker.tar"
        write_archives("bbx:latest", None, archive)
        self("load", "-i", str(archive), timeout=120, check=True)

    def terminal(self, *args: str, rows: int, columns: int) -> Terminal:
        return Terminal(self.argv(*args), self.env, rows, columns)

    # -------- leftovers

    def container_ids(self) -> list[str]:
        result = self("ps", "-a", "--format", "{{.ID}}", timeout=60)
        return result.stdout.split() if result.returncode == 0 else [f"(podman ps failed: {result.stderr})"]

    def leftovers(self, wait: float = 20.0) -> list[str]:
        """What is still there that should not be; cleaned up as well as can be."""
        problems = []
        containers = self.container_ids()
        if containers:
            problems.append(f"podman containers left: {containers}")
            self("rm", "--all", "--force", "--time", "0", timeout=120)
        # Processes go on the way out a little after podman returns (conmon, the guest).
        states = dir_entries(self.state)
        processes = wait_for_no_processes(str(self.base), wait if not states else 2)
        states = dir_entries(self.state)
        if states:
            problems.append(f"vmrun state left: {states}\n" + vmrun_debug(self.state, self.run_dir))
            for container_id in states:
                subprocess.run([str(self.runtime), "delete", "--force", container_id], capture_output=True,
                               timeout=120, env={**os.environ, "VMRUN_CONFIG": str(self.vmrun_config)})
            processes = wait_for_no_processes(str(self.base), wait)
        if processes:
            problems.append(f"processes left: {processes}")
            kill_processes(processes)
        vm_dirs = dir_entries(self.run_dir / "vm")
        if vm_dirs:
            problems.append(f"sandbox dirs left in {self.run_dir / 'vm'}: {vm_dirs}")
        # Images are mounted by nobody; a container's rootfs and /dev/shm are, until removed.
        mounts = mounts_under(self.base)
        if mounts:
            problems.append(f"mounts left: {mounts}")
            unmount_all_under(self.base)
        netns_dir = self.run_dir / "netns"  # vmrun's own, for a new netns without a path
        if dir_entries(netns_dir):
            problems.append(f"vmrun's container netns left in {netns_dir}: {dir_entries(netns_dir)}")
        if self.netns_made:
            left = self.podman_netns_left()
            if left:
                problems.append(f"podman's network namespaces left in {NETNS_DIR}: {left}")
        return problems

    def close(self) -> list[str]:
        problems = self.leftovers()
        self("rmi", "--all", "--force", timeout=120)
        if self.netns_made:
            result = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                problems.append(f"ip netns del {self.netns}: {result.stderr}")
            self.netns = ""
            if self.made_ipam_dir:  # host-local's store for podman's network, if the test made it
                shutil.rmtree(self.made_ipam_dir, ignore_errors=True)
        unmount_all_under(self.base)
        if not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            problems.append(f"could not unmount everything under {self.base}: {mounts_under(self.base)}")
        return problems
