"""containerd drives vmrun through its own shim v2, `io.containerd.vmrun.v2`
(containerd-shim-vmrun-v2): one shim process per pod holds the guest and answers
containerd's Task service over ttrpc. Most checks share one long-lived container, `main`,
whose PID 1 traps SIGTERM and exits 42."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from ctrlib import BBX_IMAGE, BOOT_TIMEOUT, Events, OutputReader, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.clients]

RUNTIME = ["--runtime", "io.containerd.vmrun.v2"]
MAIN_SCRIPT = ('trap "echo got-term; exit 42" TERM; echo main-up; i=0; '
               'while :; do i=$((i+1)); echo $i > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.3; done')


@pytest.fixture(scope="module")
def ctr(containerd):
    ctr = containerd.namespace("vmrun-shimv2", runtime_flags=RUNTIME)
    yield ctr
    left = ctr.remove_all()
    assert not left, f"tests left containers: {left}"
    wait_for(lambda: not shim_processes(ctr), timeout=30, message="every shim gone")


def shim_logs(ctr) -> str:
    """The shims' own logs and a failed sandbox's (vmrun's run dir), for a failure's message."""
    logs = sorted((ctr.ctd.run_dir / "daemon-logs").glob("shimv2-*.log*"))
    logs += sorted((ctr.ctd.run_dir / "failed").glob("*/*.log"))
    return "\n".join(f"{path.name}:\n{path.read_text(errors='replace')[-3000:]}" for path in logs)


def shim_processes(ctr) -> list[int]:
    return [pid for pid, cmdline in ctr.ctd.processes().items() if "vmrun.shimv2.main" in cmdline]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def events(ctr):
    """`ctr events` for the whole module: the topics main's life published."""
    events = Events(ctr)
    yield events
    events.close()


@pytest.fixture(scope="module")
def main(ctr, events):
    container_id = ctr.cid("main")
    proc = ctr.popen(*ctr.run_args(container_id, "sh", "-c", MAIN_SCRIPT))
    out, err = OutputReader(proc.stdout), OutputReader(proc.stderr)
    if not out.wait_for("main-up", BOOT_TIMEOUT):
        proc.kill()
        ctr.remove(container_id)
        pytest.fail(f"main did not come up: {out.text!r} {err.text!r}\n{shim_logs(ctr)}")
    ctr.wait_status(container_id, "RUNNING")
    yield container_id, proc, out
    if proc.poll() is None:
        ctr.remove(container_id)
        proc.wait(30)


def _tick(ctr, container_id: str) -> int:
    """main's tick, read on the host through the rootfs the shim mounted (an exec would be
    refused while the container is paused)."""
    try:
        return int((ctr.ctd.bundle(ctr.namespace, container_id) / "rootfs" / "tmp" / "tick").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def test_run_prints_the_guests_kernel_stdio_and_exit_status(ctr):
    container_id = ctr.cid("uname")
    result = ctr.run(container_id, "sh", "-c", 'uname -r; read line; echo "got:$line"; echo to-stderr >&2; exit 3',
                     input="from-stdin\n")
    assert result.returncode == 3, f"{result.stdout!r} {result.stderr!r}\n{shim_logs(ctr)}"
    kernel, got = result.stdout.splitlines()
    assert kernel != os.uname().release and got == "got:from-stdin"
    assert "to-stderr" in result.stderr
    wait_for(lambda: not shim_processes(ctr), timeout=20, message="the shim gone with its only task")


def test_run_with_a_file_log_uri(ctr, tmp_path):
    container_id = ctr.cid("logfile")
    log = tmp_path / "out.log"
    result = ctr("run", "--log-uri", f"file://{log}", *RUNTIME, BBX_IMAGE, container_id,
                 "sh", "-c", "echo to-the-log; echo also-stderr >&2", timeout=BOOT_TIMEOUT)
    try:
        assert result.returncode == 0, f"{result.stderr}\n{shim_logs(ctr)}"
        wait_for(lambda: log.exists() and "also-stderr" in log.read_text(), 30, message="the log file written")
        assert "to-the-log" in log.read_text()
    finally:
        ctr.remove(container_id)


def test_run_tty(ctr):
    container_id = ctr.cid("tty")
    proc = subprocess.run(ctr.tty_argv(*ctr.run_args(container_id, "sh", "-c", "tty; stty size; exit 5",
                                                     flags=("--rm", "-t"))),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    text = proc.stdout.decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text), text
    assert proc.returncode == 5, text


def test_one_shim_holds_main_and_its_execs(ctr, main):
    container_id, _, _ = main
    shims = shim_processes(ctr)
    assert len(shims) == 1
    pid, status = ctr.tasks()[container_id]
    assert status == "RUNNING" and pid == shims[0]


def test_task_exec_output_and_exit_status(ctr, main):
    container_id, _, _ = main
    result = ctr("task", "exec", "--exec-id", ctr.cid("ex1"), container_id,
                 "sh", "-c", "echo in-exec; cat /tmp/tick; exit 4")
    assert result.returncode == 4, result.stderr
    first, tick = result.stdout.splitlines()
    assert first == "in-exec" and tick.isdigit()


def test_task_exec_tty(ctr, main):
    container_id, _, _ = main
    proc = subprocess.run(ctr.tty_argv("task", "exec", "-t", "--exec-id", ctr.cid("ext"), container_id,
                                       "sh", "-c", "tty; exit 6"),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    text = proc.stdout.decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text), text
    assert proc.returncode == 6, text


def test_task_ps_lists_the_guests_pids(ctr, main):
    container_id, _, _ = main
    result = ctr("task", "ps", container_id)
    assert result.returncode == 0, result.stderr
    pids = [int(line.split()[0]) for line in result.stdout.splitlines()[1:] if line.strip()]
    shim_pid = ctr.tasks()[container_id][0]
    assert pids and shim_pid not in pids, pids
    # The guest's numbering: no host process with those pids runs main's script.
    for pid in pids:
        try:
            assert b"trap" not in open(f"/proc/{pid}/cmdline", "rb").read()
        except FileNotFoundError:
            pass


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_task_kill_of_an_exec(ctr, main, sig):
    container_id, _, _ = main
    exec_id = ctr.cid(f"victim-{sig.lower()}")
    proc = ctr.popen("task", "exec", "--exec-id", exec_id, container_id, "sh", "-c", "echo up; exec sleep 600")
    out = OutputReader(proc.stdout)
    try:
        assert out.wait_for("up", 60), out.text
        assert ctr("task", "kill", "--exec-id", exec_id, "-s", sig, container_id).returncode == 0
        assert proc.wait(30) == 128 + signal.Signals[sig]
    finally:
        _kill_group(proc)


def test_task_pause_resume(ctr, main):
    container_id, _, _ = main
    assert ctr("task", "pause", container_id).returncode == 0
    try:
        assert ctr.status(container_id) == "PAUSED"
        frozen = _tick(ctr, container_id)
        time.sleep(2)
        assert _tick(ctr, container_id) == frozen, "the container kept running while paused"
    finally:
        resumed = ctr("task", "resume", container_id)
    assert resumed.returncode == 0, resumed.stderr
    assert ctr.status(container_id) == "RUNNING"
    before = _tick(ctr, container_id)
    wait_for(lambda: _tick(ctr, container_id) > before, 30, message="ticks after resume")


def test_checkpoint_is_refused_in_one_line(ctr, main):
    container_id, _, _ = main
    result = ctr("task", "checkpoint", container_id)
    assert result.returncode != 0 and "not implemented" in result.stderr, result.stderr


def test_task_kill_sigterm_reaches_pid_1_and_its_status_ctr(ctr, main, events):
    """Last on main: its trap's status 42 is ctr run's, and the exit event says so; every
    task event of its life was published."""
    container_id, proc, out = main
    assert ctr("task", "kill", container_id).returncode == 0
    assert proc.wait(60) == 42
    assert events.wait_exit(container_id)["exit_status"] == 42
    out.join()
    assert "got-term" in out.text
    wait_for(lambda: container_id not in ctr.containers(), 30, message="container removed")
    wait_for(lambda: not shim_processes(ctr), timeout=30, message="the shim gone")
    topics = {"/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/paused",
              "/tasks/resumed", "/tasks/exit", "/tasks/delete"}
    wait_for(lambda: all(f" {topic} " in events.reader.text and container_id in events.reader.text
                         for topic in topics), 30, message=f"the events {sorted(topics)}")


def test_a_killed_shim_is_cleaned_up_by_its_delete(ctr):
    """containerd runs `containerd-shim-vmrun-v2 delete` for a shim that died: the task
    ends (137, from the DeleteResponse), and the guest's directory and mounts go; the logs
    are kept."""
    container_id = ctr.cid("shimkill")
    events = Events(ctr)
    proc = ctr.popen(*ctr.run_args(container_id, "sh", "-c", "echo up; exec sleep 600", flags=()))
    out = OutputReader(proc.stdout)
    try:
        assert out.wait_for("up", BOOT_TIMEOUT), f"{out.text!r}\n{shim_logs(ctr)}"
        [shim] = shim_processes(ctr)
        os.kill(shim, signal.SIGKILL)
        assert proc.wait(60) != 0  # ctr's wait broke off
        assert events.wait_exit(container_id, timeout=60)["exit_status"] == 137
        bundle = ctr.ctd.bundle(ctr.namespace, container_id)
        wait_for(lambda: not bundle.exists(), 30, message="containerd's cleanup of the dead shim done")
        assert not ctr.ctd.leftovers()["vmrun vm dirs"]
        assert not [m for m in ctr.ctd.leftovers()["mounts"] if "/run/vm/" in m or container_id in m]
        assert any((ctr.ctd.run_dir / "failed").glob(f"*-{container_id}/console.log"))
    finally:
        events.close()
        _kill_group(proc)
        ctr.remove(container_id)


def _tmpfs(size: str) -> list[str]:
    """A tmpfs for the container to fill: its pages count in the container's memory cgroup."""
    return ["--mount", f"type=tmpfs,src=tmpfs,dst=/fill,options=size={size}"]


def test_task_metrics_are_the_guests_cgroup(ctr):
    container_id = ctr.cid("metrics")
    limit = 256 << 20
    result = ctr("run", "-d", *RUNTIME, "--memory-limit", str(limit), *_tmpfs("100m"), BBX_IMAGE, container_id,
                 "sh", "-c", "dd if=/dev/zero of=/fill/x bs=1M count=72 2>/dev/null && touch /tmp/filled; "
                             "exec sleep 600", timeout=BOOT_TIMEOUT)
    try:
        assert result.returncode == 0, f"{result.stderr}\n{shim_logs(ctr)}"
        filled = ctr.ctd.bundle(ctr.namespace, container_id) / "rootfs" / "tmp" / "filled"
        wait_for(filled.exists, 60, message="72 MiB written to the container's tmpfs")
        metrics = ctr("task", "metrics", "--format", "json", container_id)
        assert metrics.returncode == 0, metrics.stderr
        memory = json.loads(metrics.stdout)["memory"]
        assert memory["usage"] >= 64 << 20 and memory["usage_limit"] == limit, memory
    finally:
        ctr.remove(container_id)


def test_an_oom_kill_in_the_guest_is_a_tasks_oom_event(ctr):
    container_id = ctr.cid("oom")
    events = Events(ctr)
    try:
        result = ctr("run", "--rm", *RUNTIME, "--memory-limit", str(64 << 20), *_tmpfs("200m"), BBX_IMAGE,
                     container_id, "dd", "if=/dev/zero", "of=/fill/x", "bs=1M", "count=150", timeout=BOOT_TIMEOUT)
        assert result.returncode == 137, f"{result.stdout!r} {result.stderr!r}\n{shim_logs(ctr)}"
        wait_for(lambda: "/tasks/oom" in events.reader.text, 30, message="a /tasks/oom event")
        oom_line = next(line for line in events.reader.text.splitlines() if "/tasks/oom" in line)
        assert container_id in oom_line
        text = events.reader.text
        assert text.index("/tasks/oom") < text.index("/tasks/exit"), text  # CRI's OOMKilled needs this order
    finally:
        events.close()
