"""The subprocess helper: commands for vmrun modules that need only the standard library,
and helpers that go when the process that started them goes."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmrun.errors import CommandError
from vmrun.proc import HelperProcess, stdlib_module_command


def test_stdlib_module_command_finds_vmrun_without_site(tmp_path):
    argv, env = stdlib_module_command("vmrun.common.constants", "--unused")
    assert argv == [sys.executable, "-S", "-m", "vmrun.common.constants", "--unused"]
    # Without site, and away from the checkout, vmrun is found only through the
    # PYTHONPATH the command sets.
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_vsock_backend_needs_only_the_standard_library_and_vmrun(tmp_path):
    # Started without site, the backend finds no third-party package: importing it (all of
    # its modules) must not need one.
    argv, env = stdlib_module_command("vmrun.hypervisor.vsock.vhost_user")
    code = ("import sys, vmrun.hypervisor.vsock.vhost_user.__main__; "
            "print(sorted(n for n, m in sys.modules.items() if 'site-packages' in (getattr(m, '__file__', '') or '')"
            " and not n.startswith('vmrun')))")
    result = subprocess.run([*argv[:2], "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("with_setpriv", [True, False], ids=["setpriv", "prctl in the child"])
def test_a_helper_dies_with_the_process_that_started_it(tmp_path, with_setpriv):
    env = None
    if not with_setpriv:  # a PATH with sleep and without setpriv: the fallback
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "sleep").symlink_to(shutil.which("sleep"))
        env = {**os.environ, "PATH": str(bin_dir)}
    pid_file = tmp_path / "helper.pid"
    starter_code = (
        "import sys, time\n"
        "from vmrun.proc import HelperProcess\n"
        "helper = HelperProcess('sleeper', ['sleep', '60']).start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "time.sleep(60)\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", starter_code], env=env)
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the starter did not start its helper"
            time.sleep(0.01)
        helper_pid = int(pid_file.read_text())
        # The helper is sleep itself by now (whatever ran before its exec).
        while Path(f"/proc/{helper_pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the helper never became sleep"
            time.sleep(0.01)
    finally:
        starter.kill()
        starter.wait()
    deadline = time.monotonic() + 5
    while not _gone(helper_pid):
        assert time.monotonic() < deadline, "the helper outlived the process that started it"
        time.sleep(0.01)


def test_a_helper_that_cannot_be_found_is_refused_at_once(tmp_path):
    helper = HelperProcess("ghost", [str(tmp_path / "no-such-program")], log_path=tmp_path / "ghost.log")
    with pytest.raises(CommandError, match=r"cannot start ghost \(.*no-such-program\): not found or not executable"):
        helper.start()
    assert not (tmp_path / "ghost.log").exists()  # nothing left behind
