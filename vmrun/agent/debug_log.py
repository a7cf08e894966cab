"""The agent's debug lines, off until the host asks (CreateSandboxRequest.debug, sent
when the sandbox runs with --debug): each call and how it ended, each crun command and its
status. They go where the agent's other lines go, to the guest console, which the host
keeps capped in the sandbox's console.log (and with the failed sandboxes' logs)."""

from __future__ import annotations

import sys
import time

_enabled = False


def enable(on: bool) -> None:
    global _enabled
    _enabled = on


def debug(message: str) -> None:
    if _enabled:
        print(f"vmrun-agent: debug: {time.monotonic():.3f} {message}", file=sys.stderr, flush=True)
