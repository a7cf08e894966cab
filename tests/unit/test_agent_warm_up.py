"""The agent's warm-up container: its spec, its bundle, and that it never fails the agent."""

from __future__ import annotations

import json
import socket

from vmrun.agent.processes import CommandResult
from vmrun.agent.warm_up import (
    WARM_UP_CGROUP,
    WARM_UP_CRUN_ROOT,
    WARM_UP_ID,
    WarmUp,
    wait_for_device_added,
    warm_up_spec,
)
from vmrun.common.constants import agent_kernel_params


class FakeSpawner:
    """Answers every command with `result` (or raises it), and keeps the commands."""

    def __init__(self, result: CommandResult | Exception):
        self.result = result
        self.commands: list[list[str]] = []

    def run(self, argv, *, input=b"", timeout=None):
        self.commands.append(list(argv))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_the_warm_up_container_is_nobodys():
    spec = warm_up_spec("/somewhere/rootfs")
    assert spec["root"] == {"path": "/somewhere/rootfs", "readonly": True}
    assert spec["process"]["args"] == ["/bin/true"] and not spec["process"]["terminal"]
    # Not under /vmrun, where crun puts the sandbox's containers by their ids.
    assert spec["linux"]["cgroupsPath"] == WARM_UP_CGROUP and not WARM_UP_CGROUP.startswith("/vmrun/")
    # The guest's network: a container's new network namespace is the agent's spare one.
    kinds = {ns["type"] for ns in spec["linux"]["namespaces"]}
    assert "network" not in kinds and {"pid", "mount", "ipc", "uts", "cgroup"} <= kinds
    binds = [m for m in spec["mounts"] if m["type"] == "bind"]
    assert binds == [{"destination": "/bin/true", "type": "bind", "source": "/usr/bin/busybox",
                      "options": ["rbind", "ro"]}]


def test_prepare_writes_a_bundle_crun_runs_with_its_own_root(tmp_path):
    spawner = FakeSpawner(CommandResult(0, b"", b""))
    lines: list[str] = []
    warm_up = WarmUp(spawner, lines.append, bundle=str(tmp_path / "warm"))
    warm_up.prepare()
    spec = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert spec["root"]["path"] == str(tmp_path / "warm" / "rootfs")
    assert (tmp_path / "warm" / "rootfs").is_dir()

    assert warm_up.run()
    [command] = spawner.commands
    assert command[1:] == ["--root", WARM_UP_CRUN_ROOT, "run", "--bundle", str(tmp_path / "warm"), WARM_UP_ID]
    assert len(lines) == 1 and lines[0].startswith("warm-up container ran in ")


def test_a_warm_up_that_fails_is_logged_forced_away_and_never_raises(tmp_path):
    lines: list[str] = []
    spawner = FakeSpawner(CommandResult(1, b"", b"noise\ncrun: cannot mount\n"))
    failing = WarmUp(spawner, lines.append, bundle=str(tmp_path))
    assert not failing.run()
    # What crun left (its state, its cgroup) is deleted.
    assert spawner.commands[1][1:] == ["--root", WARM_UP_CRUN_ROOT, "delete", "--force", WARM_UP_ID]
    unstartable = WarmUp(FakeSpawner(OSError(2, "No such file or directory")), lines.append, bundle=str(tmp_path))
    assert not unstartable.run()
    assert lines == ["warm-up container failed (1): crun: cannot mount",
                     "warm-up container not run: [Errno 2] No such file or directory"]


def test_a_clone_runs_it_once_a_device_is_added(tmp_path):
    kernel, events = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    spawner = FakeSpawner(CommandResult(0, b"", b""))
    thread = WarmUp(spawner, lambda line: None, bundle=str(tmp_path)).run_after_resume(events)
    kernel.send(b"change@/devices/virtual/misc/something\0ACTION=change")
    thread.join(0.3)
    assert thread.is_alive() and spawner.commands == []  # not for a change
    kernel.send(b"add@/devices/pci0000:00/0000:00:02.0/0000:01:00.0\0ACTION=add")
    thread.join(5)
    assert not thread.is_alive() and len(spawner.commands) == 1
    assert events.fileno() == -1  # the uevent socket is closed once used
    kernel.close()


def test_an_error_on_the_uevent_socket_counts_as_events():
    # ENOBUFS: more events than the socket's buffer held, the hot-plug's burst.
    class Overflowing:
        def recv(self, size: int) -> bytes:
            raise OSError(105, "No buffer space available")

    wait_for_device_added(Overflowing())  # returns, does not raise


def test_the_host_asks_for_a_warm_up_under_tcg_with_a_vcpu_to_spare():
    assert agent_kernel_params(True, 2).split() == ["vmrun.agent_port=1024", "vmrun.warm_up=1"]
    assert agent_kernel_params(True, 1).split() == ["vmrun.agent_port=1024"]
    assert agent_kernel_params(False, 4).split() == ["vmrun.agent_port=1024"]
