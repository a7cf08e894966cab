"""runc's life cycle across CLI calls: create, start, exec, ps, pause/resume, kill, delete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from leftovers import wait_for

pytestmark = pytest.mark.integration




def status(vm_env, container_id):
    result = vm_env.vmrun("state", container_id)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_create_start_exec_kill_delete(vm_env):
    bundle = vm_env.bundle("life", ["sh", "-c", "echo init-out; echo init-err >&2; exec sleep 600"])
    out, err = vm_env.base / "out", vm_env.base / "err"
    pid_file = vm_env.base / "init.pid"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        result = subprocess.run(
            [*vm_env.cli(), "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "life"],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=vm_env.env, timeout=180)
    assert result.returncode == 0, err.read_text()
    shim = int(pid_file.read_text())
    doc = status(vm_env, "life")
    assert doc["status"] == "created" and doc["pid"] == shim and doc["bundle"] == str(bundle)

    assert vm_env.vmrun("start", "life").returncode == 0
    wait_for(lambda: b"init-out" in out.read_bytes() and b"init-err" in err.read_bytes())
    assert status(vm_env, "life")["status"] == "running"

    # A foreground exec relays and returns its status; a detached one gets a shim of its own.
    fg = vm_env.vmrun("exec", "life", "sh", "-c", "echo exec-out; exit 3")
    assert fg.returncode == 3 and fg.stdout == b"exec-out\n"
    exec_pid_file = vm_env.base / "exec.pid"
    bg = vm_env.vmrun("exec", "--detach", "--pid-file", str(exec_pid_file), "life", "sleep", "600", detached=True)
    assert bg.returncode == 0
    exec_shim = int(exec_pid_file.read_text())
    # ps's table lists the container's processes as the guest sees them: its init, the exec;
    # its JSON, the host pids standing for them (what containerd matches execs by).
    table = vm_env.vmrun("ps", "life").stdout.decode().splitlines()
    assert table[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    rows = [line.split(None, 7) for line in table[1:]]
    assert [row[7] for row in rows] == ["sleep 600", "sleep 600"] and {row[0] for row in rows} == {"0"}, table
    ps = vm_env.vmrun("ps", "--format", "json", "life")
    assert sorted(json.loads(ps.stdout)) == sorted([shim, exec_shim])

    assert vm_env.vmrun("pause", "life").returncode == 0
    assert status(vm_env, "life")["status"] == "paused"
    assert vm_env.vmrun("pause", "life").returncode != 0
    assert vm_env.vmrun("resume", "life").returncode == 0
    assert status(vm_env, "life")["status"] == "running"

    # Resource limits and statistics, as containerd's CRI plugin uses them.
    update = vm_env.vmrun("update", "--resources", "-", "life",
                          input=json.dumps({"memory": {"limit": 64 << 20}, "pids": {"limit": 100}}).encode())
    assert update.returncode == 0, update.stderr
    events = vm_env.vmrun("events", "--stats", "life")
    assert events.returncode == 0, events.stderr
    event = json.loads(events.stdout)
    assert event["type"] == "stats" and event["id"] == "life"
    assert event["data"]["memory"]["usage"]["limit"] == 64 << 20
    assert event["data"]["memory"]["usage"]["usage"] > 0 and event["data"]["pids"]["current"] >= 2
    assert event["data"]["cpu"]["usage"]["total"] > 0

    # Killing the exec's shim takes the exec's process in the guest with it.
    def sleepers() -> int:
        return int(vm_env.vmrun("exec", "life", "sh", "-c", "ps -o args | grep -c '^sleep 600'").stdout)

    assert sleepers() == 2  # init (exec'd into sleep 600) and the detached exec
    os.kill(exec_shim, signal.SIGKILL)
    wait_for(lambda: sleepers() == 1)
    wait_for(lambda: json.loads(vm_env.vmrun("ps", "--format", "json", "life").stdout) == [shim])

    refused = vm_env.vmrun("delete", "life")
    assert refused.returncode != 0 and b"running" in refused.stderr

    assert vm_env.vmrun("kill", "life", "0").returncode == 0  # alive: signal 0 only asks
    assert status(vm_env, "life")["status"] == "running"
    assert vm_env.vmrun("kill", "life", "9").returncode == 0
    wait_for(lambda: status(vm_env, "life")["status"] == "stopped")
    assert vm_env.vmrun("kill", "life", "0").returncode != 0  # as runc: not running
    assert vm_env.vmrun("delete", "life").returncode == 0
    assert vm_env.vmrun("state", "life").returncode != 0


# Stands in for containerd's shim: a subreaper that runs create, feeds the container's
# stdin, and reaps the pid-file process as its child, taking its status as the container's.
CALLER = """
import ctypes, os, subprocess, sys
cli, bundle, pid_file = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
stdin_r, stdin_w = os.pipe()
subprocess.run([*cli, "create", "--bundle", bundle, "--pid-file", pid_file, "status"], stdin=stdin_r, check=True)
os.close(stdin_r)
shim = int(open(pid_file).read())
subprocess.run([*cli, "start", "status"], stdin=subprocess.DEVNULL, check=True)
os.write(stdin_w, b"go\\n")
os.close(stdin_w)
_, wait_status = os.waitpid(shim, 0)
print(os.waitstatus_to_exitcode(wait_status))
"""


@pytest.mark.parametrize("script, expected", [("read x; exit 7", 7), ("read x; kill -9 $$; sleep 600", 137)])
def test_init_exit_status_is_the_shim_status(vm_env, script, expected):
    bundle = vm_env.bundle("status", ["sh", "-c", script])
    if expected == 137:
        # Only a signal sent from outside its pid namespace kills a container's init.
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
        (bundle / "config.json").write_text(json.dumps(spec))
    caller = subprocess.run([sys.executable, "-c", CALLER, *vm_env.cli(), str(bundle), str(vm_env.base / "pid")],
                            capture_output=True, env=vm_env.env, timeout=300)
    assert caller.returncode == 0, caller.stderr
    assert int(caller.stdout) == expected
    assert vm_env.vmrun("delete", "status").returncode == 0


def test_delete_force_of_a_running_container(vm_env):
    bundle = vm_env.bundle("forced", ["sleep", "600"])
    assert vm_env.vmrun("create", "--bundle", str(bundle), "forced", detached=True).returncode == 0
    # Paused and resumed before it started, it is still only created.
    assert vm_env.vmrun("pause", "forced").returncode == 0
    assert vm_env.vmrun("resume", "forced").returncode == 0
    assert status(vm_env, "forced")["status"] == "created"
    assert vm_env.vmrun("start", "forced").returncode == 0
    assert vm_env.vmrun("delete", "--force", "forced").returncode == 0
    assert vm_env.vmrun("state", "forced").returncode != 0


def pod_bundle(vm_env, name, kind, pod_shim=0):
    bundle = vm_env.bundle(name, ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {"io.kubernetes.cri.container-type": kind, "io.kubernetes.cri.sandbox-id": "pod"}
    if pod_shim:
        # As containerd's CRI plugin does: join the sandbox's namespaces by /proc/<pid>/ns paths.
        spec["linux"]["namespaces"] = [{"type": t, "path": f"/proc/{pod_shim}/ns/{t}"} for t in ("pid", "ipc", "uts")]
        spec["linux"]["namespaces"].append({"type": "mount"})
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def test_a_pod_of_three_containers_shares_one_guest(vm_env):
    sandbox = pod_bundle(vm_env, "pod-sandbox", "sandbox")
    assert vm_env.vmrun("create", "--bundle", str(sandbox), "pod", detached=True).returncode == 0
    assert vm_env.vmrun("start", "pod").returncode == 0
    pod_shim = status(vm_env, "pod")["pid"]
    for member in ("member1", "member2"):
        bundle = pod_bundle(vm_env, member, "container", pod_shim)
        assert vm_env.vmrun("create", "--bundle", str(bundle), member, detached=True).returncode == 0
        assert vm_env.vmrun("start", member).returncode == 0
    vm_dirs = list((vm_env.base / "run" / "vm").iterdir())
    assert len(vm_dirs) == 1, "the pod's containers must share one guest"
    # One pid namespace: a member sees the sandbox's sleep and the other member's.
    seen = vm_env.vmrun("exec", "member1", "sh", "-c", "ps -o comm | grep -c sleep")
    assert seen.returncode == 0 and int(seen.stdout) == 3, seen
    # Deleted as kubelet does, containers first, then the sandbox: the guest goes with it.
    for container in ("member1", "member2", "pod"):
        assert vm_env.vmrun("delete", "--force", container).returncode == 0
    assert not list((vm_env.base / "run" / "vm").iterdir())


def test_containers_asking_for_new_network_namespaces_each_get_one(vm_env):
    """The pod's first container joins the namespace the agent made ahead of time, the
    second one crun makes: each is new (only a loopback, up), and they are not the same."""
    sandbox = pod_bundle(vm_env, "netns-sandbox", "sandbox")
    member = pod_bundle(vm_env, "netns-member", "container")  # a new network namespace too
    namespaces = {}
    try:
        for name, bundle in (("pod", sandbox), ("netmember", member)):
            assert vm_env.vmrun("create", "--bundle", str(bundle), name, detached=True).returncode == 0
            assert vm_env.vmrun("start", name).returncode == 0
            shown = vm_env.vmrun("exec", name, "sh", "-c",
                                 "readlink /proc/self/ns/net; ls /sys/class/net; cat /sys/class/net/lo/flags")
            assert shown.returncode == 0, shown.stderr
            namespace, links, lo_flags = shown.stdout.decode().split("\n", 2)
            assert links == "lo" and int(lo_flags, 16) & 0x1, shown.stdout  # IFF_UP
            namespaces[name] = namespace
    finally:
        for name in ("netmember", "pod"):
            vm_env.vmrun("delete", "--force", name)
    assert len(set(namespaces.values())) == 2, namespaces
