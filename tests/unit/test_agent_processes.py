"""The agent's reaper collects every child (it is PID 1 in the guest), so each test runs it
in a child interpreter where it cannot steal the test runner's own children."""

import signal
import subprocess
import sys
import textwrap

from vmrun.agent.processes import exit_status


def run_isolated(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_exit_status_follows_runc():
    assert exit_status(7 << 8) == (7, 0)
    assert exit_status(signal.SIGKILL) == (137, 9)


def test_spawner_runs_and_captures():
    run_isolated("""
        from vmrun.agent.processes import Reaper, Spawner
        result = Spawner(Reaper().start()).run(["/bin/sh", "-c", "cat; echo err >&2; exit 3"], input=b"hello")
        assert (result.returncode, result.stdout, result.stderr) == (3, b"hello", b"err\\n"), result
    """)


def test_failed_spawn_leaks_no_fds():
    run_isolated("""
        import os
        from vmrun.agent.processes import Reaper, Spawner
        spawner = Spawner(Reaper().start())
        before = sorted(os.listdir("/proc/self/fd"))
        try:
            spawner.run(["/nonexistent/command"])
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("the spawn should have failed")
        assert sorted(os.listdir("/proc/self/fd")) == before
    """)


def test_reaper_reports_signal_deaths_and_keeps_them_on_the_child():
    run_isolated("""
        import os, signal
        from vmrun.agent.processes import Reaper, Spawner, exit_status
        reaper = Reaper().start()
        null = os.open("/dev/null", os.O_RDWR)
        child = Spawner(reaper).spawn(["/bin/sleep", "30"], stdin=null, stdout=null, stderr=null)
        assert reaper.kill(child, signal.SIGKILL)
        assert exit_status(reaper.wait(child, timeout=10)) == (137, 9)
        assert exit_status(reaper.wait(child, timeout=0)) == (137, 9)
        # Exited: its pid may be another process's by now, so it is not signalled.
        assert not reaper.kill(child, signal.SIGKILL)
        assert not reaper._live and not reaper._unclaimed
    """)


def test_orphans_are_reaped_as_subreaper():
    run_isolated("""
        import time
        from vmrun.common import linux
        from vmrun.agent.processes import Reaper, Spawner, exit_status
        linux.become_subreaper()
        reaper = Reaper().start()
        spawner = Spawner(reaper)
        # The shell starts a grandchild and exits at once: the grandchild becomes ours.
        early = spawner.run(["/bin/sh", "-c", "sh -c 'sleep 0.1; exit 5' & echo $!"])
        time.sleep(1.0)  # reaped before anyone registers: found among unclaimed statuses
        assert exit_status(reaper.wait(reaper.watch(int(early.stdout)), timeout=0)) == (5, 0)
        late = spawner.run(["/bin/sh", "-c", "sh -c 'sleep 0.5; exit 4' & echo $!"])
        assert exit_status(reaper.wait(reaper.watch(int(late.stdout)), timeout=10)) == (4, 0)
        assert not reaper._live and not reaper._unclaimed
    """)


def test_unclaimed_statuses_are_bounded():
    run_isolated("""
        import os, time
        from vmrun.agent import processes
        from vmrun.common import linux
        from vmrun.agent.processes import Reaper, Spawner
        processes._UNCLAIMED_LIMIT = 3
        linux.become_subreaper()
        reaper = Reaper().start()
        # Each grandchild outlives its shell, so it becomes ours and exits unclaimed.
        script = "for i in 1 2 3 4 5 6 7 8; do sh -c 'sleep 0.2' & echo $!; done"
        orphans = [int(pid) for pid in Spawner(reaper).run(["/bin/sh", "-c", script]).stdout.split()]
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in orphans) and time.monotonic() < deadline:
            time.sleep(0.05)
        with reaper._cond:  # reaped under the lock: recorded once we hold it
            assert len(reaper._unclaimed) == 3, reaper._unclaimed
    """)


def test_stale_unclaimed_status_of_a_reused_pid_is_ignored():
    run_isolated("""
        import os, signal
        from vmrun.agent.processes import Reaper, Spawner, exit_status
        reaper = Reaper().start()
        null = os.open("/dev/null", os.O_RDWR)
        child = Spawner(reaper).spawn(["/bin/sleep", "30"], stdin=null, stdout=null, stderr=null)
        # As if an earlier process under the same pid had exited unclaimed, and the living
        # one were only learned of from a pid file.
        reaper._live.pop(child.pid)
        reaper._unclaimed[child.pid] = 0
        watched = reaper.watch(child.pid)
        assert reaper.wait(watched, timeout=0) is None
        assert reaper.kill(watched, signal.SIGKILL)
        assert exit_status(reaper.wait(watched, timeout=10)) == (137, 9)
    """)


def test_spawn_after_idle_is_reaped_promptly():
    run_isolated("""
        import time
        from vmrun.agent.processes import Reaper, Spawner
        spawner = Spawner(Reaper().start())
        for _ in range(5):
            time.sleep(0.05)  # the reaper has no children and sleeps until the next spawn
            started = time.monotonic()
            assert spawner.run(["/bin/true"]).returncode == 0
            assert time.monotonic() - started < 0.9
    """)
