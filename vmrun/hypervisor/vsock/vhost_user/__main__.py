"""`python -m vmrun.hypervisor.vsock.vhost_user --socket PATH --uds PATH --cid N`.

Listens on --socket (vhost-user, for QEMU) and --uds (hybrid vsock, for the host) before
anything else, serves until SIGTERM/SIGINT or until QEMU disconnects, and removes both
socket files on the way out. Logs to stderr, rate-limited and size-capped (logs.py).

With --qemu-fd and --host-fd it serves listeners its starter made at those paths instead
(and leaves the paths to it); with --run-as UID it then becomes that user and group, with
no capability left and no way to gain one: it parses what the guest writes, and needs
nothing of root's once it holds its sockets (guest memory and eventfds come from QEMU as
fds; the host ports it connects to are made reachable for that group).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import resource
import signal
import socket
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


_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000


def _become_unprivileged(uid: int) -> None:
    """User and group `uid`, no supplementary groups, no capabilities, no_new_privs, and
    network and IPC namespaces of its own: nothing to reach but the sockets it holds and
    the host ports made for it (path-named unix sockets, which no network namespace
    hides), not the host's TCP services nor its abstract sockets. The parent-death signal
    (set by our starter) is cleared by the change of ids: set again."""
    if uid <= 0:
        raise ValueError(f"--run-as needs an unprivileged id, not {uid}")
    starter = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWIPC)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl")
    if os.getppid() != starter:
        raise OSError(errno.ESRCH, "our starter went while we dropped privileges")


def _report_ready(fd: int | None, message: str) -> None:
    """vmrun.proc.ReadyPipe's protocol, without importing it."""
    if fd is not None:
        try:
            os.write(fd, message.encode())
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmrun.hypervisor.vsock.vhost_user")
    parser.add_argument("--socket", required=True, type=Path, help="vhost-user socket for QEMU")
    parser.add_argument("--uds", required=True, type=Path, help="hybrid vsock host socket")
    parser.add_argument("--cid", required=True, type=int, help="the guest's CID (>= 3)")
    parser.add_argument("--buf-alloc", type=int, default=DEFAULT_BUF_ALLOC,
                        help="receive window per connection, in bytes")
    parser.add_argument("--qemu-fd", type=int, help="a listening socket at --socket, made by our starter")
    parser.add_argument("--host-fd", type=int, help="a listening socket at --uds, made by our starter")
    parser.add_argument("--run-as", type=int, help="serve as this user and group id, unprivileged")
    parser.add_argument("--ready-fd", type=int, help="write OK here once serving, or ERR and why")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every message")
    args = parser.parse_args(argv)
    log_handler = logs.configure(args.verbose)
    _raise_fd_limit()
    listeners = None
    if args.qemu_fd is not None and args.host_fd is not None:
        listeners = (socket.socket(fileno=args.host_fd), socket.socket(fileno=args.qemu_fd))
    try:
        backend = VsockBackend(args.socket, args.uds, args.cid, buf_alloc=args.buf_alloc, listeners=listeners)
        if args.run_as is not None:
            # The host ports are reached through the directory itself, whatever its
            # parents allow the unprivileged user.
            ports_dir = os.open(args.uds.parent, os.O_PATH | os.O_DIRECTORY)
            backend.port_prefix = f"/proc/self/fd/{ports_dir}/{args.uds.name}_"
            _become_unprivileged(args.run_as)
    except (OSError, ValueError) as exc:
        logging.error("cannot start: %s", exc)
        _report_ready(args.ready_fd, f"ERR cannot start: {exc}")
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
    _report_ready(args.ready_fd, "OK")
    backend.run()
    logging.info("stopped")
    return 2 if backend.failed else 0


if __name__ == "__main__":
    sys.exit(main())
