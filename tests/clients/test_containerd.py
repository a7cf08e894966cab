"""containerd + ctr drive vmrun as their runc: the shim `io.containerd.runc.v2`, BinaryName=vmrun.

Every `ctr run` boots a guest (about 5 s under TCG), so most checks share one long-lived
container, `main`, whose PID 1 is a shell that traps SIGTERM and exits 42.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ctrlib import BOOT_TIMEOUT, PAUSE_IMAGE, Events, OutputReader, exit_code_warning, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.clients]

# PID 1 of `main`: a tick file the host can read through the overlay rootfs, and a TERM trap.
# The tick is renamed into place: a reader never finds the file truncated and still empty.
MAIN_SCRIPT = ('trap "echo got-term; exit 42" TERM; echo main-up; i=0; '
               'while :; do i=$((i+1)); echo $i > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.3; done')


@pytest.fixture(scope="module")
def ctr(containerd):
    ctr = containerd.namespace("vmrun-ctr")
    yield ctr
    left = ctr.remove_all()
    assert not left, f"tests left containers: {left}"


@pytest.fixture(scope="module")
def main(ctr):
    """The shared container: `ctr run` in the foreground, so its exit status is ctr's."""
    container_id = ctr.cid("main")
    proc = ctr.popen(*ctr.run_args(container_id, "sh", "-c", MAIN_SCRIPT))
    out = OutputReader(proc.stdout)
    err = OutputReader(proc.stderr)
    if not out.wait_for("main-up", BOOT_TIMEOUT):
        proc.kill()
        ctr.remove(container_id)
        pytest.fail(f"main container did not come up: {out.text!r} {err.text!r}\n{ctr.ctd.log_tail()}")
    ctr.wait_status(container_id, "RUNNING")
    handle = MainContainer(container_id, proc, out, err)
    yield handle
    if proc.poll() is None:
        ctr.remove(container_id)
        proc.wait(30)


class MainContainer:
    def __init__(self, container_id, proc, out, err):
        self.id, self.proc, self.out, self.err = container_id, proc, out, err


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # script(1) takes SIGTERM down to its child
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _tick(ctr, main) -> int:
    rootfs = ctr.ctd.bundle(ctr.namespace, main.id) / "rootfs"
    try:
        return int((rootfs / "tmp" / "tick").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


# ---- images (no guest) ----

def test_images_imported(ctr):
    result = ctr("image", "ls", "-q")
    assert result.returncode == 0, result.stderr
    assert {"docker.io/library/bbx:latest", PAUSE_IMAGE} <= set(result.stdout.split())


# ---- one guest per run ----

def test_run_rm_prints_the_guest_kernel(ctr):
    container_id = ctr.cid("uname")
    result = ctr.run(container_id, "uname", "-r")
    assert result.returncode == 0, result.stderr
    guest_release = result.stdout.strip()
    assert guest_release and guest_release != os.uname().release, (guest_release, os.uname().release)
    assert container_id not in ctr.containers()  # --rm removed it


def test_run_exit_code_and_stdio(ctr):
    container_id = ctr.cid("exit7")
    result = ctr.run(container_id, "sh", "-c", 'read line; echo "got:$line"; echo to-stderr >&2; exit 7',
                     input="from-stdin\n")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "got:from-stdin\n"
    assert "to-stderr" in result.stderr


def test_run_tty(ctr):
    container_id = ctr.cid("tty")
    proc = subprocess.Popen(ctr.tty_argv(*ctr.run_args(container_id, "sh", "-c", "tty; exit 3", flags=("--rm", "-t"))),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = OutputReader(proc.stdout)
    init_pid = ctr.ctd.bundle(ctr.namespace, container_id) / "init.pid"
    try:
        # vmrun create writes init.pid once the container exists; runc needs < 1 s from there.
        wait_for(lambda: init_pid.exists() or proc.poll() is not None, BOOT_TIMEOUT, message="vmrun create")
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            # A create that never completes for containerd's shim (e.g. a process of vmrun's
            # holding the runtime's stdout, which go-runc reads to EOF): unblock it by killing
            # the pid vmrun named as the container; start then fails and ctr removes it (--rm).
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(init_pid.read_text()), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            out.join()
            pytest.fail(f"ctr run -t still waited 20 s after vmrun create wrote {init_pid.name}; "
                        f"after killing that pid ctr said {out.text.strip()!r}")
        out.join()
        assert re.search(r"/dev/pts/\d+", out.text), out.text
        assert proc.returncode == 3, out.text
    finally:
        _kill_group(proc)
        ctr.remove(container_id)


def test_task_kill_sigkill_reported_by_events_ls_and_delete(ctr):
    container_id = ctr.cid("sleeper")
    events = Events(ctr)
    try:
        result = ctr.run(container_id, "sleep", "600", flags=("-d",))
        assert result.returncode == 0, result.stderr
        ctr.wait_status(container_id, "RUNNING")
        # A sleep that is PID 1 of its pid namespace has no handler: SIGTERM does nothing.
        assert ctr("task", "kill", container_id).returncode == 0
        time.sleep(2)
        assert ctr.status(container_id) == "RUNNING"
        assert ctr("task", "kill", "-s", "SIGKILL", container_id).returncode == 0
        ctr.wait_status(container_id, "STOPPED")
        assert events.wait_exit(container_id)["exit_status"] == 128 + signal.SIGKILL
        deleted = ctr("task", "delete", container_id)
        assert deleted.returncode == 0, deleted.stderr
        assert exit_code_warning(deleted.stderr, container_id) == 128 + signal.SIGKILL
        assert ctr("container", "delete", container_id).returncode == 0
    finally:
        events.close()
        ctr.remove(container_id)


def test_init_killed_inside_the_guest(ctr):
    """The guest kernel's memory cgroup OOM-kills PID 1: ctr sees 137, the guest lives on."""
    container_id = ctr.cid("oom")
    try:
        result = ctr.run(container_id, "sh", "-c", "a=0123456789abcdef; while :; do a=$a$a; done",
                         flags=("-d", "--memory-limit", str(32 * 2**20)))
        assert result.returncode == 0, result.stderr
        ctr.wait_status(container_id, "STOPPED", timeout=60)
        # Killed in the guest, not lost with it: its kernel logged the kill and still runs.
        logs = "".join(p.read_text(errors="replace") for p in (ctr.ctd.run_dir / "vm").glob("*/console.log"))
        assert re.search(r"out of memory: Killed process \d+ \(sh\)", logs), logs
        assert any("qemu-system" in cmd for cmd in ctr.ctd.processes().values())
        deleted = ctr("task", "delete", container_id)
        assert deleted.returncode == 0, deleted.stderr
        assert exit_code_warning(deleted.stderr, container_id) == 128 + signal.SIGKILL
    finally:
        ctr.remove(container_id)


# ---- the shared container ----

def test_task_ls_shows_main_running(ctr, main):
    pid, status = ctr.tasks()[main.id]
    assert status == "RUNNING" and pid > 0
    # The pid containerd reaps stands for the container on the host (vmrun's shim).
    assert Path(f"/proc/{pid}").exists()


def test_task_exec(ctr, main):
    result = ctr("task", "exec", "--exec-id", ctr.cid("ex1"), main.id,
                 "sh", "-c", "echo in-exec; uname -r; cat /tmp/tick; exit 4", timeout=60)
    assert result.returncode == 4, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "in-exec" and lines[1] != os.uname().release and lines[2].isdigit(), lines


def test_task_exec_tty(ctr, main):
    proc = subprocess.run(ctr.tty_argv("task", "exec", "-t", "--exec-id", ctr.cid("ext"), main.id,
                                       "sh", "-c", "tty; exit 5"),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    text = proc.stdout.decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text), text
    assert proc.returncode == 5, text


def test_task_exec_tty_interactive(ctr, main):
    exec_id = ctr.cid("exti")
    # `read -t`: should the exec never get its input, it still ends (and with it whatever it
    # holds up in containerd's shim for main: task ps, pause, kill) without killing the client.
    proc = subprocess.Popen(ctr.tty_argv("task", "exec", "-t", "--exec-id", exec_id, main.id,
                                         "sh", "-c", 'tty; read -t 15 line; echo "got-$line"; exit 6'),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = OutputReader(proc.stdout)
    started = time.monotonic()
    try:
        interactive = out.wait_for("/dev/pts/", 10)
        if interactive:
            # Reported started while it runs: listed with its exec id (not hanging task ps).
            rows = _ps(ctr, main, timeout=10)
            assert any(exec_id in info for info in rows.values()), rows
            proc.stdin.write(b"hello\n")
            proc.stdin.flush()
        proc.wait(60)
        out.join()
        assert interactive, (f"ctr task exec -t showed nothing for 10 s; it ended after "
                             f"{time.monotonic() - started:.0f} s with {proc.returncode}, printing {out.text!r}")
        assert "got-hello" in out.text, out.text
        assert proc.returncode == 6, out.text
    finally:
        _kill_group(proc)
        # Whatever happened, main must answer again before the next test uses it.
        wait_for(lambda: _ps_answers(ctr, main), 60, interval=1, message="task ps of main answering")


def _ps_answers(ctr, main) -> bool:
    try:
        return ctr("task", "ps", main.id, timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _ps(ctr, main, timeout: float = 60) -> dict[int, str]:
    result = ctr("task", "ps", main.id, timeout=timeout)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        pid, _, info = line.strip().partition(" ")
        rows[int(pid)] = info.strip()
    return rows


def test_task_ps_and_exec_killed_inside_the_guest(ctr, main):
    victim_id, killer_id = ctr.cid("victim"), ctr.cid("killer")
    victim = ctr.popen("task", "exec", "--exec-id", victim_id, main.id,
                       "sh", "-c", "echo $$ > /tmp/victim.pid; echo victim-up; exec sleep 600")
    out = OutputReader(victim.stdout)
    try:
        assert out.wait_for("victim-up", 60), out.text
        init_pid = ctr.tasks()[main.id][0]
        rows = wait_for(lambda: r if len(r := _ps(ctr, main)) == 2 else None, 30, message="two processes")
        assert init_pid in rows
        [exec_pid] = [pid for pid in rows if pid != init_pid]
        assert victim_id in rows[exec_pid], rows
        # SIGKILL from another process in the guest: the exec reports 137.
        killer = ctr("task", "exec", "--exec-id", killer_id, main.id, "sh", "-c", "kill -KILL $(cat /tmp/victim.pid)")
        assert killer.returncode == 0, killer.stderr
        assert victim.wait(30) == 128 + signal.SIGKILL
        wait_for(lambda: list(_ps(ctr, main)) == [init_pid], 30, message="only init left")
    finally:
        _kill_group(victim)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_task_kill_exec_from_the_host(ctr, main, sig):
    exec_id = ctr.cid(f"hostkill-{sig.lower()}")
    proc = ctr.popen("task", "exec", "--exec-id", exec_id, main.id, "sh", "-c", "echo up; exec sleep 600")
    out = OutputReader(proc.stdout)
    try:
        assert out.wait_for("up", 60), out.text
        wait_for(lambda: len(_ps(ctr, main)) == 2, 30, message="exec listed")
        killed = ctr("task", "kill", "--exec-id", exec_id, "-s", sig, main.id)
        assert killed.returncode == 0, killed.stderr
        assert proc.wait(30) == 128 + signal.Signals[sig]
        # Gone in the guest too, not just its stand-in on the host.
        listing = ctr("task", "exec", "--exec-id", ctr.cid(f"check-{sig.lower()}"), main.id, "ps", "-o", "args")
        assert listing.returncode == 0 and "sleep 600" not in listing.stdout, listing.stdout
    finally:
        _kill_group(proc)


def test_task_pause_resume(ctr, main):
    assert ctr("task", "pause", main.id).returncode == 0
    try:
        assert ctr.status(main.id) == "PAUSED"
        frozen = _tick(ctr, main)
        time.sleep(2)
        assert _tick(ctr, main) == frozen, "the container kept running while paused"
    finally:
        resumed = ctr("task", "resume", main.id)
    assert resumed.returncode == 0, resumed.stderr
    assert ctr.status(main.id) == "RUNNING"
    before = _tick(ctr, main)
    wait_for(lambda: _tick(ctr, main) > before, 30, message="ticks after resume")
    result = ctr("task", "exec", "--exec-id", ctr.cid("afterresume"), main.id, "echo", "alive")
    assert result.returncode == 0 and result.stdout == "alive\n", result.stderr


def test_task_kill_sigterm_trapped_then_delete(ctr, main):
    """Last on main: SIGTERM reaches the trap of PID 1, whose status 42 reaches ctr."""
    assert ctr("task", "kill", main.id).returncode == 0
    assert main.proc.wait(60) == 42
    main.out.join()
    assert "got-term" in main.out.text
    # ctr run deleted the task and (--rm) the container: vmrun's delete ran.
    wait_for(lambda: main.id not in ctr.containers(), 30, message="container removed")
    found = ctr.ctd.wait_settled()
    assert not found["vmrun vm dirs"] and not found["vmrun states"], found
