"""Answers virtiofsd's chmods that carry S_ISUID/S_ISGID, which its seccomp filter
(seccomp.py) hands us: the mode is applied without S_ISUID (and without S_ISGID but on
directories), and the call succeeds. Package managers in the guest (dpkg unpacking
`passwd`, `install -m 4755`, GNU `tar -xp`) keep working, and no file the guest touches
becomes setuid or setgid on the host, where any user who reaches the bundle could run it.

A thread of the process that holds the sandbox; it ends when virtiofsd does (the
listener hangs up).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import threading

from vmrun.hypervisor.seccomp import native_arch

log = logging.getLogger("vmrun.mode_supervisor")

# struct seccomp_notif: id, pid, flags, then seccomp_data (nr, arch, ip, args[6]);
# struct seccomp_notif_resp: id, val, error, flags.
_NOTIF = struct.Struct("=QII" "iIQ6Q")
_RESP = struct.Struct("=QqiI")
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64)
_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8) | 0
_NOTIF_SEND = 0xC0000000 | (_RESP.size << 16) | (ord("!") << 8) | 1
_NOTIF_ID_VALID = 0x40000000 | (8 << 16) | (ord("!") << 8) | 2

_PATH_MAX = 4096


def _read_string(pid: int, address: int) -> str | None:
    """A NUL-terminated string of at most a path's length from the memory of thread
    `pid`; None if unreadable or longer."""
    try:
        memory = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = b""
        while len(data) < _PATH_MAX:
            at = address + len(data)
            chunk = os.pread(memory, 4096 - at % 4096, at)  # to the page's end: the next may be unmapped
            if not chunk:
                return None
            data += chunk
            if b"\0" in data:
                return data.split(b"\0", 1)[0].decode(errors="surrogateescape")
    except OSError:
        return None
    finally:
        os.close(memory)
    return None


class ModeSupervisor:
    """Serves one helper's listener: `serve(channel)` receives it from seccomp_exec over
    `channel`, in a thread, until the helper exits."""

    def __init__(self, helper_name: str):
        self.helper_name = helper_name
        self.helper_pid = 0
        self.stripped = 0  # chmods applied without their set-id bits
        self._thread: threading.Thread | None = None

    def serve(self, channel: socket.socket, helper_pid: int) -> None:
        self.helper_pid = helper_pid
        self._thread = threading.Thread(target=self._run, args=(channel,), name=f"{self.helper_name}-modes",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, channel: socket.socket) -> None:
        try:
            with channel:
                channel.settimeout(30)
                _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            if not fds:
                return  # the helper failed before its filter was in place: it says why
            listener = fds[0]
            os.set_inheritable(listener, False)  # no helper started later may hold it
            try:
                self._serve(listener)
            finally:
                os.close(listener)
        except OSError as exc:
            log.warning("%s: mode supervisor stopped: %s", self.helper_name, exc)

    def _serve(self, listener: int) -> None:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while True:
            events = poller.poll()
            if any(event & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, event in events):
                return  # the helper is gone
            request = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(listener, _NOTIF_RECV, request, True)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):  # the caller died meanwhile
                    continue
                raise
            notification_id, pid, _, nr, _, _, *args = _NOTIF.unpack(request)
            result = self._answer(listener, notification_id, pid, nr, args)
            try:
                fcntl.ioctl(listener, _NOTIF_SEND, bytearray(_RESP.pack(notification_id, 0, result, 0)), True)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def _answer(self, listener: int, notification_id: int, pid: int, nr: int, args: list[int]) -> int:
        """0 once the chmod is done without set-id bits, or -errno."""
        syscalls = native_arch().syscalls
        if nr == syscalls.get("fchmod"):
            target, mode = f"/proc/{pid}/fd/{ctypes.c_int(args[0]).value}", args[1]
        elif nr in (syscalls.get("fchmodat"), syscalls.get("fchmodat2")):
            target, mode = self._fchmodat_target(pid, ctypes.c_int(args[0]).value, args[1]), args[2]
            if nr == syscalls.get("fchmodat2") and args[3] != 0:
                target = None
        else:
            target, mode = None, 0
        # The file is pinned first, then the request checked: if the caller was replaced
        # meanwhile (its pid reused), what was read from it and through its fds is void.
        try:
            pinned = os.open(target, os.O_PATH | os.O_CLOEXEC) if target is not None else None
        except OSError as exc:
            pinned, failure = None, -(exc.errno or errno.EPERM)
        else:
            failure = -errno.EPERM
        try:
            try:
                fcntl.ioctl(listener, _NOTIF_ID_VALID, bytearray(struct.pack("=Q", notification_id)), True)
            except OSError:
                return -errno.ENOENT
            if pinned is None:
                return failure
            mode &= 0o7777 & ~stat.S_ISUID
            if not stat.S_ISDIR(os.fstat(pinned).st_mode):
                mode &= ~stat.S_ISGID  # setgid on a directory only makes new files inherit its group
            os.chmod(f"/proc/self/fd/{pinned}", mode)
        except OSError as exc:
            return -(exc.errno or errno.EPERM)
        finally:
            if pinned is not None:
                os.close(pinned)
        self.stripped += 1
        return 0

    def _fchmodat_target(self, pid: int, dirfd: int, path_address: int) -> str | None:
        """The file of virtiofsd's fchmodat(<its /proc/self/fd>, "<fd number>", mode): the
        only form it uses. Anything else is refused."""
        name = _read_string(pid, path_address)
        if not name or not (name.isascii() and name.isdigit()) or dirfd < 0:
            return None
        try:
            if os.readlink(f"/proc/{pid}/fd/{dirfd}") != f"/proc/{self.helper_pid}/fd":
                return None
        except OSError:
            return None
        return f"/proc/{self.helper_pid}/fd/{name}"
