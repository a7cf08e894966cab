import json
import os
import subprocess
import sys

import pytest

from vmrun.cli import parse_signal
from vmrun.errors import VmrunError


@pytest.mark.parametrize("text, number", [("9", 9), ("KILL", 9), ("SIGTERM", 15), ("term", 15), ("SIGUSR1", 10)])
def test_signals_by_name_or_number(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "99", "NOPE", "SIG"])
def test_bad_signals(text):
    with pytest.raises(VmrunError):
        parse_signal(text)


def vmrun(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vmrun.cli", *args], capture_output=True, text=True, **kwargs)


def test_unknown_id_one_line_error_and_json_log(tmp_path):
    log = tmp_path / "log.json"
    result = vmrun("--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json", "state", "nosuch")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    line = json.loads(log.read_text().strip().splitlines()[-1])
    assert line["level"] == "error" and "does not exist" in line["msg"] and line["time"]


def test_delete_force_of_unknown_id_succeeds(tmp_path):
    assert vmrun("--root", str(tmp_path), "delete", "--force", "nosuch").returncode == 0
    assert vmrun("--root", str(tmp_path), "delete", "nosuch").returncode == 1


def test_spec_writes_config(tmp_path):
    assert vmrun("spec", "--bundle", str(tmp_path)).returncode == 0
    assert json.loads((tmp_path / "config.json").read_text())["ociVersion"]
    again = vmrun("spec", "--bundle", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr


def test_version():
    result = vmrun("--version")
    assert result.returncode == 0 and "vmrun version" in result.stdout


def test_env_prints_the_effective_configuration(tmp_path):
    config = tmp_path / "vmrun.toml"
    config.write_text('vcpus = 3\nacceleration = "tcg"\n')
    result = vmrun("env", env={**os.environ, "VMRUN_CONFIG": str(config)})
    assert result.returncode == 0
    assert "vcpus = 3" in result.stdout and 'acceleration = "tcg"' in result.stdout
    assert str(config) in result.stdout


def test_check_reports_what_is_missing(tmp_path):
    config = tmp_path / "vmrun.toml"
    config.write_text(f'qemu = "/nonexistent/qemu"\nacceleration = "tcg"\nrun_dir = "{tmp_path}/run"\n'
                      f'kernel = "{tmp_path}/no-kernel"\ninitrd = "{tmp_path}/no-initrd"\n')
    result = vmrun("check", env={**os.environ, "VMRUN_CONFIG": str(config)})
    assert result.returncode == 1
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines["QEMU"] == "MISSING" and lines["guest"] == "MISSING" and lines["acceleration"] == "ok"
    assert lines["pod"] == "ok"  # /dev/net/tun opens here
