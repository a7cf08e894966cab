"""OCI hooks: checked as the spec defines them, run with the state on stdin, failures told."""

from __future__ import annotations

import json
import logging

import pytest

from vmrun.errors import BundleError
from vmrun.hooks import Hook, HookError, hook_state, parse_hooks, run_hooks, run_hooks_logging_failures


def test_hooks_are_parsed_by_kind():
    spec = {"hooks": {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "true"], "env": ["A=1"], "timeout": 5}],
                      "poststop": [{"path": "/bin/true"}]}}
    hooks = parse_hooks(spec)
    assert hooks["prestart"] == [Hook("/bin/sh", ("sh", "-c", "true"), ("A=1",), 5)]
    assert hooks["poststop"] == [Hook("/bin/true")]
    assert parse_hooks({}) == {}


@pytest.mark.parametrize("hooks, message", [
    ({"prestart": [{"path": "true"}]}, r"hooks.prestart\[0\].path must be an absolute path"),
    ({"poststart": [{}]}, r"hooks.poststart\[0\].path"),
    ({"prestart": [{"path": "/bin/true", "args": "x"}]}, "args must be a list of strings"),
    ({"prestart": [{"path": "/bin/true", "env": ["NOEQUALS"]}]}, "env must be a list of NAME=VALUE"),
    ({"prestart": [{"path": "/bin/true", "timeout": 0}]}, "timeout must be a positive"),
    ({"prestart": [{"path": "/bin/true", "timeout": True}]}, "timeout must be a positive"),
    ({"preStart": []}, "unknown hook kind"),
    ({"prestart": {"path": "/bin/true"}}, "hooks.prestart must be a list"),
])
def test_bad_hooks_are_refused_in_one_line(hooks, message):
    with pytest.raises(BundleError, match=message) as refused:
        parse_hooks({"hooks": hooks})
    assert "\n" not in str(refused.value)


def test_a_hook_reads_the_state_gets_its_args_and_env(tmp_path):
    script = f'cat > {tmp_path}/state; head -c 10 /proc/$$/cmdline > {tmp_path}/argv; echo " $0 $MARK" >> {tmp_path}/argv'
    hooks = parse_hooks({"hooks": {"createRuntime": [
        {"path": "/bin/sh", "args": ["hook-argv0", "-c", script, "first"], "env": ["MARK=marked"]}]}})
    run_hooks(hooks, "createRuntime", hook_state("c1", "creating", 1234, "/bundle", {"a": "b"}))
    # argv[0] is the spec's args[0], not the path, as with execv.
    assert (tmp_path / "argv").read_text() == "hook-argv0 first marked\n"
    assert json.loads((tmp_path / "state").read_text()) == {
        "ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1234, "bundle": "/bundle",
        "annotations": {"a": "b"}}


def test_a_stopped_containers_state_has_no_pid():
    assert "pid" not in hook_state("c1", "stopped", 1234, "/b", {})


def test_the_first_failing_hook_stops_the_rest(tmp_path):
    marker = tmp_path / "ran"
    hooks = parse_hooks({"hooks": {"prestart": [
        {"path": "/bin/sh", "args": ["sh", "-c", "echo broken network >&2; exit 3"]},
        {"path": "/bin/sh", "args": ["sh", "-c", f"touch {marker}"]}]}})
    with pytest.raises(HookError, match=r"prestart hook #0 \(/bin/sh\) failed with exit status 3: broken network"):
        run_hooks(hooks, "prestart", hook_state("c1", "creating", 1, "/b", {}))
    assert not marker.exists()


def test_a_hook_past_its_timeout_fails():
    hooks = parse_hooks({"hooks": {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]}})
    with pytest.raises(HookError, match="did not finish within 1s"):
        run_hooks(hooks, "prestart", hook_state("c1", "creating", 1, "/b", {}))


def test_a_missing_hook_fails_clearly():
    hooks = parse_hooks({"hooks": {"createContainer": [{"path": "/nonexistent/hook"}]}})
    with pytest.raises(HookError, match="/nonexistent/hook: command not found"):
        run_hooks(hooks, "createContainer", hook_state("c1", "creating", 1, "/b", {}))


def test_poststop_failures_are_logged_and_the_rest_still_run(tmp_path, caplog):
    marker = tmp_path / "ran"
    hooks = parse_hooks({"hooks": {"poststop": [
        {"path": "/bin/false"}, {"path": "/bin/sh", "args": ["sh", "-c", f"touch {marker}"]}]}})
    with caplog.at_level(logging.WARNING):
        run_hooks_logging_failures(hooks, "poststop", hook_state("c1", "stopped", 0, "/b", {}))
    assert marker.exists()
    assert "poststop hook #0 (/bin/false) failed with exit status 1" in caplog.text
