"""What a dead sandbox daemon leaves, reclaimed by the next call that meets its pod.

A daemon killed with SIGKILL (or by the OOM killer) takes its helpers with it
(PDEATHSIG) and QEMU takes the guest's RAM (a memfd), but its guest directory stays: the
containers' files bind-mounted into the share, sockets, logs, a host cgroup. Rather than
wait for `delete`, any call that loads the pod's state (state, list, kill, ...) removes
them, keeping the logs with the other failed sandboxes' (kept_logs.py). The state entry
itself stays until `delete`, which then has nothing left to undo in the guest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmrun.config import Config
from vmrun.errors import ContainerNotFoundError
from vmrun.state import ContainerState, StateStore

log = logging.getLogger("vmrun.orphans")


def is_orphaned(state: ContainerState) -> bool:
    """The pod's guest directory is there but the daemon that held it is not."""
    return (state.owns_guest and bool(state.vm_dir) and Path(state.vm_dir).is_absolute()
            and Path(state.vm_dir).exists() and not state.daemon.alive())


def reclaim_orphaned(config: Config, store: StateStore, states: list[ContainerState]) -> None:
    """Reclaim the guest directory of each pod in `states` whose daemon died; a pod that
    someone is working on (its lock held: a create, a delete) is left to them."""
    for state in states:
        if not is_orphaned(state):
            continue
        try:
            with store.locked_if_free(state.id) as held:
                if held:
                    _reclaim(config, store.load(state.id))
        except ContainerNotFoundError:
            continue  # deleted meanwhile


def _reclaim(config: Config, state: ContainerState) -> None:
    if not is_orphaned(state):  # looked at again, under the lock
        return
    # Imported here: `vmrun state` and `list` stay light when nothing is orphaned.
    from vmrun.kept_logs import keep_logs
    from vmrun.sandbox import daemon_log_for
    from vmrun.sandbox_daemon import stop_sandbox_daemon

    vm_dir = Path(state.vm_dir)
    kept = keep_logs(vm_dir, config.run_dir / "failed", state.id, extra=[daemon_log_for(vm_dir)])
    stop_sandbox_daemon(state.daemon, vm_dir, state.host_cgroup)
    log.warning("the sandbox daemon of %r died; its guest's files are reclaimed%s", state.id,
                f" (logs kept in {kept})" if kept else "")
