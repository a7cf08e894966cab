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


def test_reaper_reports_signal_deaths_once():
    run_isolated("""
        import os, signal
        from vmrun.agent.processes import Reaper, Spawner, exit_status
        reaper = Reaper().start()
        null = os.open("/dev/null", os.O_RDWR)
        pid = Spawner(reaper).spawn(["/bin/sleep", "30"], stdin=null, stdout=null, stderr=null)
        os.kill(pid, signal.SIGKILL)
        assert exit_status(reaper.wait(pid, timeout=10)) == (137, 9)
        assert reaper.wait(pid, timeout=0.1) is None
    """)


def test_orphans_are_reaped_as_subreaper():
    run_isolated("""
        import os
        from vmrun.agent import linux
        from vmrun.agent.processes import Reaper, Spawner, exit_status
        linux.become_subreaper()
        reaper = Reaper().start()
        # The shell starts a grandchild and exits at once: the grandchild becomes ours.
        result = Spawner(reaper).run(["/bin/sh", "-c", "sh -c 'exit 5' & echo $!"])
        orphan = int(result.stdout)
        assert exit_status(reaper.wait(orphan, timeout=10)) == (5, 0)
    """)
