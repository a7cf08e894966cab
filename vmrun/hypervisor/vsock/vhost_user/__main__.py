"""`python -m vmrun.hypervisor.vsock.vhost_user --socket PATH --uds PATH --cid N`.

Listens on --socket (vhost-user, for QEMU) and --uds (hybrid vsock, for the host) before
anything else, serves until SIGTERM/SIGINT or until QEMU disconnects, and removes both
socket files on the way out. Logs to stderr, rate-limited and size-capped (logs.py).
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from pathlib import Path

from . import logs
from .backend import VsockBackend
from .connections import DEFAULT_BUF_ALLOC


def _raise_fd_limit() -> None:
    # Every vsock connection holds a host socket: take all the fds we are allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmrun.hypervisor.vsock.vhost_user")
    parser.add_argument("--socket", required=True, type=Path, help="vhost-user socket for QEMU")
    parser.add_argument("--uds", required=True, type=Path, help="hybrid vsock host socket")
    parser.add_argument("--cid", required=True, type=int, help="the guest's CID (>= 3)")
    parser.add_argument("--buf-alloc", type=int, default=DEFAULT_BUF_ALLOC,
                        help="receive window per connection, in bytes")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every message")
    args = parser.parse_args(argv)
    log_handler = logs.configure(args.verbose)
    _raise_fd_limit()
    try:
        backend = VsockBackend(args.socket, args.uds, args.cid, buf_alloc=args.buf_alloc)
    except (OSError, ValueError) as exc:
        logging.error("cannot start: %s", exc)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        logging.info("%s: stopping", signal.Signals(signum).name)
        backend.stop()

    signal.set_wakeup_fd(backend.wakeup_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.info("listening: vhost-user %s, host %s, guest cid %d",
                 args.socket, args.uds, args.cid)
    log_handler.mark_head()  # a cut of the log keeps this much
    backend.run()
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
