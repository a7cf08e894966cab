"""OCI hooks (runtime-spec config.md, "POSIX-platform Hooks"), run where runc runs them.

prestart, createRuntime and createContainer run on the host during `create`, once the
guest holds the created container and before its process starts; poststart after
`start`, poststop once the container is gone. startContainer runs inside the container,
so it goes to crun in the guest with the spec (see oci.guest_spec). Each hook reads the
container's state JSON on stdin. A failing create-time hook fails the create; poststart
and poststop failures are logged and the life cycle goes on, as the spec says.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from vmrun.common.default_spec import OCI_VERSION
from vmrun.errors import BundleError, CommandError, VmrunError
from vmrun.proc import run

log = logging.getLogger("vmrun.hooks")

# In the order the runtime-spec calls them during create.
CREATE_HOOKS = ("prestart", "createRuntime", "createContainer")
GUEST_HOOKS = ("startContainer",)
# runc's order in `features`.
SUPPORTED_HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class HookError(VmrunError):
    """A hook failed where its failure fails the operation (create-time hooks)."""


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] | None = None  # None: the runtime's own environment, as runc
    timeout: int | None = None  # seconds

    @classmethod
    def from_spec(cls, kind: str, index: int, entry: object) -> Hook:
        where = f"hooks.{kind}[{index}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{where} must be an object")
        path = entry.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BundleError(f"{where}.path must be an absolute path")
        args, env, timeout = entry.get("args"), entry.get("env"), entry.get("timeout")
        if args is not None and not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise BundleError(f"{where}.args must be a list of strings")
        if env is not None and not (isinstance(env, list) and all(isinstance(e, str) and "=" in e for e in env)):
            raise BundleError(f"{where}.env must be a list of NAME=VALUE strings")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
            raise BundleError(f"{where}.timeout must be a positive number of seconds")
        return cls(path, tuple(args or ()), None if env is None else tuple(env), timeout)



def parse_hooks(spec: dict) -> dict[str, list[Hook]]:
    """The spec's hooks by kind, checked; a BundleError naming the first bad one."""
    hooks = spec.get("hooks")
    if hooks is None:
        return {}
    if not isinstance(hooks, dict):
        raise BundleError("hooks must be an object")
    parsed: dict[str, list[Hook]] = {}
    for kind, entries in hooks.items():
        if kind not in SUPPORTED_HOOKS:
            raise BundleError(f"hooks.{kind}: unknown hook kind (known: {', '.join(SUPPORTED_HOOKS)})")
        if not isinstance(entries, list):
            raise BundleError(f"hooks.{kind} must be a list")
        parsed[kind] = [Hook.from_spec(kind, index, entry) for index, entry in enumerate(entries)]
    return parsed


def hook_state(container_id: str, status: str, pid: int, bundle: str, annotations: dict) -> dict:
    """The state a hook reads on stdin (runtime-spec runtime.md, "State")."""
    state = {"ociVersion": OCI_VERSION, "id": container_id, "status": status, "bundle": bundle,
             "annotations": annotations or {}}
    if status != "stopped":
        state["pid"] = pid
    return state


def _run_hook(kind: str, index: int, hook: Hook, state: dict) -> None:
    env = None if hook.env is None else dict(entry.split("=", 1) for entry in hook.env)
    argv = list(hook.args) or [hook.path]
    try:
        result = run(argv, executable=hook.path, input=json.dumps(state).encode(), env=env,
                     timeout=hook.timeout, check=False)
    except CommandError as exc:
        raise HookError(f"{kind} hook #{index} ({hook.path}): {exc}") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        detail = f": {output[-1].strip()}" if output else ""
        raise HookError(f"{kind} hook #{index} ({hook.path}) failed with exit status {result.returncode}{detail}")


def run_hooks(hooks: dict[str, list[Hook]], kind: str, state: dict) -> None:
    """Run the hooks of `kind` in order; the first failure raises HookError."""
    for index, hook in enumerate(hooks.get(kind, ())):
        _run_hook(kind, index, hook, state)


def run_hooks_logging_failures(hooks: dict[str, list[Hook]], kind: str, state: dict) -> None:
    """Run every hook of `kind`; failures are warnings (poststart, poststop)."""
    for index, hook in enumerate(hooks.get(kind, ())):
        try:
            _run_hook(kind, index, hook, state)
        except HookError as exc:
            log.warning("%s", exc)
