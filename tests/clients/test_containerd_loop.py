"""Ten containers through containerd, one after another: nothing of them may stay.

Even rounds: `ctr run --rm` (create, start, wait, delete). Odd rounds: `ctr run -d`
(create, start), `ctr task kill -s SIGKILL`, `ctr task delete`, `ctr container delete`.
Afterwards: no process, mount, socket or directory of theirs is left, on the host side of
vmrun (QEMU, sandbox daemons, shims, run_dir/vm, state root) or of containerd (shims,
task bundles, shim sockets, fifos, snapshots).
"""

from __future__ import annotations

import signal

import pytest

from ctrlib import exit_code_warning

pytestmark = [pytest.mark.integration, pytest.mark.clients]

ROUNDS = 10


def _snapshots(ctr) -> set[str]:
    result = ctr("snapshot", "ls")
    assert result.returncode == 0, result.stderr
    return {line.split()[0] for line in result.stdout.splitlines()[1:] if line.split()}


def test_ten_containers_leave_nothing_behind(containerd):
    ctr = containerd.namespace("vmrun-loop")
    before = containerd.wait_settled()
    assert not before["processes"] and not before["vmrun vm dirs"], f"not a clean start: {before}"
    snapshots_before = _snapshots(ctr)

    for round_ in range(ROUNDS):
        container_id = ctr.cid(f"loop{round_}")
        if round_ % 2 == 0:
            result = ctr.run(container_id, "sh", "-c", f"echo loop-{round_}")
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"loop-{round_}\n"
        else:
            result = ctr.run(container_id, "sleep", "600", flags=("-d",))
            assert result.returncode == 0, result.stderr
            ctr.wait_status(container_id, "RUNNING")
            assert ctr("task", "kill", "-s", "SIGKILL", container_id).returncode == 0
            ctr.wait_status(container_id, "STOPPED")
            deleted = ctr("task", "delete", container_id)
            assert deleted.returncode == 0, deleted.stderr
            assert exit_code_warning(deleted.stderr, container_id) == 128 + signal.SIGKILL
            assert ctr("container", "delete", container_id).returncode == 0
        assert container_id not in ctr.containers()
        # vmrun's delete is synchronous: its guest is gone when the task is.
        assert not containerd.leftovers()["vmrun vm dirs"], f"round {round_}"

    found = containerd.wait_settled()
    # A ctr client an earlier test killed leaves its fifo dir for good: only new ones count.
    found["fifo dirs"] = sorted(set(found["fifo dirs"]) - set(before["fifo dirs"]))
    assert found == {key: [] for key in found}, found
    assert _snapshots(ctr) == snapshots_before
    assert ctr.containers() == []
    assert ctr.tasks() == {}
