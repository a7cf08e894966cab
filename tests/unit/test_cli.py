import json
import os
import subprocess
import sys

import pytest

from vmrun.cli import parse_signal
from vmrun.errors import VmrunError


@pytest.mark.parametrize("text, number", [("9", 9), ("KILL", 9), ("SIGTERM", 15), ("term", 15), ("SIGUSR1", 10),
                                          ("0", 0)])
def test_signals_by_name_or_number(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["99", "65", "NOPE", "SIG", "\u00b2", "-1"])
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


def test_log_format_defaults_to_text_as_runc():
    from vmrun.cli import build_parser

    assert build_parser().parse_args(["state", "x"]).log_format == "text"
    assert build_parser().parse_args(["--log-format", "json", "state", "x"]).log_format == "json"


def test_log_file_is_text_by_default(tmp_path):
    log = tmp_path / "log.txt"
    result = vmrun("--root", str(tmp_path / "root"), "--log", str(log), "state", "nosuch")
    assert result.returncode == 1
    line = log.read_text().strip().splitlines()[-1]
    assert line.startswith('time="') and ' level=error msg="container \'nosuch\' does not exist"' in line


def _broken_config(tmp_path):
    config = tmp_path / "vmrun.toml"
    config.write_text('memory_mb = 512\n')  # a typo
    return {**os.environ, "VMRUN_CONFIG": str(config)}


def test_state_list_kill_delete_ignore_a_broken_config(tmp_path):
    env, root = _broken_config(tmp_path), str(tmp_path / "root")
    listing = vmrun("--root", root, "list", "--format", "json", env=env)
    assert listing.returncode == 0 and json.loads(listing.stdout) == [] and listing.stderr == ""
    assert vmrun("--root", root, "ls", "-q", env=env).returncode == 0
    assert vmrun("--root", root, "delete", "--force", "nosuch", env=env).returncode == 0
    # They fail for what they were asked, not for the config.
    for command in (["state", "nosuch"], ["kill", "nosuch", "KILL"], ["delete", "nosuch"]):
        result = vmrun("--root", root, *command, env=env)
        assert result.returncode == 1 and "does not exist" in result.stderr and "memory_mb" not in result.stderr


def test_a_broken_config_is_logged_for_them(tmp_path):
    log = tmp_path / "log.json"
    result = vmrun("--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json", "list",
                   env=_broken_config(tmp_path))
    assert result.returncode == 0 and result.stderr == ""
    line = json.loads(log.read_text().strip().splitlines()[-1])
    assert line["level"] == "warning" and "memory_mb" in line["msg"]


@pytest.mark.parametrize("command", [["env"], ["check"], ["start", "x"], ["pause", "x"], ["exec", "x", "true"],
                                     ["template", "list"], ["run", "x"]])
def test_other_commands_refuse_a_broken_config(tmp_path, command):
    env = _broken_config(tmp_path)
    result = vmrun("--root", str(tmp_path / "root"), *command, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"vmrun: {env['VMRUN_CONFIG']}: unknown setting 'memory_mb' "
                                     "(did you mean 'memory_mib'?)")


def test_check_reports_what_is_missing(tmp_path):
    config = tmp_path / "vmrun.toml"
    # run_dir must be short (sockets lie below it); check with tcg writes nothing there.
    config.write_text(f'qemu = "/nonexistent/qemu"\nacceleration = "tcg"\nrun_dir = "/run/vmrun-unit-test"\n'
                      f'kernel = "{tmp_path}/no-kernel"\ninitrd = "{tmp_path}/no-initrd"\n')
    result = vmrun("check", env={**os.environ, "VMRUN_CONFIG": str(config)})
    assert result.returncode == 1
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines["QEMU"] == "MISSING" and lines["guest"] == "MISSING" and lines["acceleration"] == "ok"
    assert lines["pod"] == "ok"  # /dev/net/tun opens here


def test_features_says_what_runs():
    result = subprocess.run([sys.executable, "-m", "vmrun.cli", "features"], capture_output=True, check=True)
    features = json.loads(result.stdout)
    assert features["ociVersionMax"] == "1.3.0"
    assert features["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                                 "poststop"]


def test_a_usage_error_is_one_line_and_in_the_log_too(tmp_path):
    log = tmp_path / "log.json"
    for command in (["kill"], ["create", "--bogus", "x"], ["events", "--interval", "0", "x"]):
        result = vmrun("--root", str(tmp_path), "--log", str(log), "--log-format", "json", *command)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr  # as runc
        assert json.loads(log.read_text().splitlines()[-1])["msg"] in result.stderr
    assert "duration interval must be greater than 0" in log.read_text()


@pytest.mark.parametrize("interval, seconds", [("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0), ("2", 2.0)])
def test_event_intervals_as_go_writes_them(interval, seconds):
    from vmrun.cli import _seconds

    assert _seconds(interval) == seconds


@pytest.mark.parametrize("interval", ["0", "0s", "-1", "nan", "inf", "1d", "\u0662s"])
def test_bad_event_intervals(interval):
    import argparse

    from vmrun.cli import _seconds

    with pytest.raises(argparse.ArgumentTypeError):
        _seconds(interval)


def test_a_log_file_that_cannot_be_opened_fails_the_command(tmp_path):
    result = vmrun("--root", str(tmp_path), "--log", str(tmp_path / "no" / "log.json"), "list", "-q")
    assert result.returncode == 1
    assert result.stderr == f"vmrun: cannot open log file {tmp_path / 'no' / 'log.json'}: No such file or directory\n"


def test_a_bug_of_ours_is_still_one_line_where_the_caller_looks(tmp_path):
    log = tmp_path / "log.json"
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vmrun.cli as cli; cli.cmd_list = lambda args: 1 / 0; cli.main()",
         "--root", str(tmp_path), "--log", str(log), "--log-format", "json", "list"],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "vmrun: internal error: ZeroDivisionError: division by zero\n"
    assert json.loads(log.read_text())["msg"] == "internal error: ZeroDivisionError: division by zero"


def test_a_newline_in_a_message_stays_on_one_line(tmp_path):
    result = vmrun("spec", "--bundle", str(tmp_path / "no\nwhere"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no\\nwhere" in result.stderr


def test_delete_removes_what_a_create_that_died_early_left(tmp_path):
    for force in (False, True):
        debris = tmp_path / "c1"
        debris.mkdir()
        os.utime(debris, (0, 0))  # old: no create is still making it
        result = vmrun("--root", str(tmp_path), "delete", *(["--force"] if force else []), "c1")
        assert result.returncode == (0 if force else 1) and not debris.exists()
        if not force:
            assert "does not exist" in result.stderr


def test_a_terminal_with_a_console_socket_that_is_not_one_is_refused_before_the_boot(tmp_path):
    from vmrun.oci import default_spec

    (tmp_path / "bundle" / "rootfs").mkdir(parents=True)
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(default_spec()))  # terminal: true
    (tmp_path / "file").write_text("")
    for socket_path, why in ((tmp_path / "none", "No such file or directory"), (tmp_path / "file", "not a socket")):
        result = vmrun("--root", str(tmp_path / "root"), "create", "--bundle", str(tmp_path / "bundle"),
                       "--console-socket", str(socket_path), "c1")
        assert result.returncode == 1
        assert result.stderr == f"vmrun: cannot use console socket {socket_path}: {why}\n"
        assert not (tmp_path / "root" / "c1").exists()


def test_an_exec_process_file_that_is_no_process_is_refused(tmp_path):
    process = tmp_path / "process.json"
    for content, why in ((b"[1]", "process must be an object"), (b"{}", "process.args must be"),
                         (b'{"args": "sh"}', "process.args must be"), (b"\xff", "cannot read process file")):
        process.write_bytes(content)
        result = vmrun("--root", str(tmp_path), "exec", "--process", str(process), "c1")
        assert result.returncode == 1 and why in result.stderr and result.stderr.count("\n") == 1


def test_events_of_a_stopped_container_is_an_error_as_runc(tmp_path):
    from vmrun.state import ContainerState, StateStore

    StateStore(tmp_path).create(ContainerState("c1", "/b", "/b/rootfs", "stopped"))
    result = vmrun("--root", str(tmp_path), "events", "c1")
    assert result.returncode == 1 and "it is stopped" in result.stderr and result.stdout == ""


def test_kill_says_first_that_the_container_does_not_exist(tmp_path):
    result = vmrun("--root", str(tmp_path), "kill", "nosuch", "FOO")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_signal_0_asks_whether_the_container_runs(tmp_path):
    from vmrun.state import ContainerState, StateStore

    StateStore(tmp_path).create(ContainerState("c1", "/b", "/b/rootfs", "stopped"))
    result = vmrun("--root", str(tmp_path), "kill", "c1", "0")
    assert result.returncode == 1 and "is not running" in result.stderr


def test_list_as_runc_prints_it(tmp_path):
    import pwd

    from vmrun.state import ContainerState, StateStore

    long_id = "f" * 64  # containerd's ids
    StateStore(tmp_path).create(ContainerState(long_id, "/b" * 30, "/b/rootfs", "stopped"))
    owner = pwd.getpwuid(os.getuid()).pw_name
    table = vmrun("--root", str(tmp_path), "list").stdout.splitlines()
    assert table[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    cells = table[1].split()  # columns never run together, whatever their width
    assert cells[:4] == [long_id, "0", "stopped", "/b" * 30] and cells[-1] == owner
    listed = json.loads(vmrun("--root", str(tmp_path), "list", "--format", "json").stdout)
    assert [(c["id"], c["owner"]) for c in listed] == [(long_id, owner)]
    assert vmrun("--root", str(tmp_path), "list", "-q", "--format", "json").stdout == long_id + "\n"


def test_version_as_runc_and_crun_print_theirs():
    lines = vmrun("--version").stdout.splitlines()
    assert lines[0].startswith("vmrun version ") and lines[1].startswith("spec: 1.")


@pytest.mark.parametrize("size", ["0", "-1", "257", "two"])
def test_a_pool_size_out_of_range_is_refused_before_anything_starts(tmp_path, size):
    result = vmrun("--root", str(tmp_path), "pool", "serve", "--size", size)
    assert result.returncode == 1 and "must be a number of guests from 1 to 256" in result.stderr


def test_template_list_goes_on_past_a_damaged_record(tmp_path):
    for name in ("kernel", "initrd"):
        (tmp_path / name).write_bytes(b"")
    config = tmp_path / "vmrun.toml"
    config.write_text(f'kernel = "{tmp_path}/kernel"\ninitrd = "{tmp_path}/initrd"\nacceleration = "tcg"\n'
                      f'templates_dir = "{tmp_path}/templates"\n')
    for name, record in (("default", "{bad"), ("other", "[1]")):
        (tmp_path / "templates" / name).mkdir(parents=True)
        (tmp_path / "templates" / name / "record.json").write_text(record)
    result = vmrun("template", "list", env={**os.environ, "VMRUN_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("stale" in line for line in lines), lines
