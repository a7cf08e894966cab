"""Signals: forwarded to a guest process, or turned into an orderly unwinding."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

from vmrun.errors import Interrupted
from vmrun.threads import InThread

# Signals the host process standing for a guest process passes on to it. Not forwarded:
# SIGKILL/SIGSTOP (cannot be caught), SIGCHLD, SIGWINCH (a terminal resize, handled apart),
# SIGPIPE, and the synchronous faults that would mean the relay itself crashed.
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH, signal.SIGPIPE,
                 signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS)
    and s < signal.SIGRTMIN
)


@contextmanager
def forward_signals(deliver: Callable[[int], None], signals: tuple[int, ...] = FORWARDED_SIGNALS) -> Iterator[None]:
    previous = {sig: signal.signal(sig, lambda signum, _frame: deliver(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_in_thread(wait: Callable[[], int]) -> int:
    """Run a blocking wait in a thread so the main thread stays free for signal handlers."""
    return int(InThread(wait, "wait").result(poll=0.2))


@contextmanager
def interrupted_by_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) -> Iterator[None]:
    """While booting and setting up, a stop signal raises Interrupted instead of killing us,
    so every context manager on the way out undoes what it made."""

    def raise_interrupted(signum: int, _frame: object) -> None:
        # Once: a second signal must not break off the clean-up the first one started.
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)

    previous = {sig: signal.signal(sig, raise_interrupted) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
