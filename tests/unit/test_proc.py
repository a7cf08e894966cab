"""The subprocess helper's command for vmrun modules that need only the standard library."""

import subprocess
import sys

from vmrun.proc import stdlib_module_command


def test_stdlib_module_command_finds_vmrun_without_site(tmp_path):
    argv, env = stdlib_module_command("vmrun.agent.constants", "--unused")
    assert argv == [sys.executable, "-S", "-m", "vmrun.agent.constants", "--unused"]
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
