"""`python -S -m vmrun.hypervisor.seccomp_exec FD PROGRAM [ARG...]`: install the set-id
filter (seccomp.py) on this process, send the filter's listener over the unix socket FD,
and become PROGRAM. The pid stays the same, so whoever started us holds PROGRAM's pid,
its parent-death signal and its log; PROGRAM cannot remove the filter, and every thread
it starts inherits it.
"""

from __future__ import annotations

import os
import socket
import sys

from vmrun.hypervisor.seccomp import load_with_listener, native_arch, set_id_filter


def main(argv: list[str]) -> int:
    channel_fd, program = int(argv[0]), argv[1:]
    arch = native_arch()
    listener = load_with_listener(set_id_filter(arch), arch)
    with socket.socket(fileno=channel_fd) as channel:
        socket.send_fds(channel, [b"L"], [listener])
    os.close(listener)  # only the supervisor may answer: never PROGRAM itself
    os.execv(program[0], program)
    return 127  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as exc:
        print(f"seccomp_exec: {exc}", file=sys.stderr)
        sys.exit(126)
