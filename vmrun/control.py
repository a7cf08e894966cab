"""Control sockets: how `vmrun network` (or a `create` that took a pooled guest) reaches
the process that holds a guest's QEMU, and how `create` asks the pool for a guest.

One JSON request per connection, one JSON reply: {"ok": true, "result": ...} or
{"ok": false, "error": "one line"}.
"""

from __future__ import annotations

import json
import logging
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

from vmrun.common.bridge import close_listener, read_line
from vmrun.errors import VmrunError

log = logging.getLogger("vmrun.control")

CONTROL_SOCKET = "control.sock"
_MAX_REQUEST = 64 * 1024

Handler = Callable[[dict], object]


class ControlError(VmrunError):
    """The request was refused or failed, or nothing answered (the message says which)."""


class ControlServer:
    """Serves `handlers` (by op name) on `path` until closed."""

    def __init__(self, path: Path, handlers: dict[str, Handler]):
        self.path = path
        self._handlers = handlers
        _clear_stale_socket(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        threading.Thread(target=self._accept_loop, name="control", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = json.loads(read_line(conn, _MAX_REQUEST) or b"null")
                handler = self._handlers.get(request.get("op")) if isinstance(request, dict) else None
                if handler is None:
                    reply = {"ok": False, "error": f"unknown control request {request!r}"[:200]}
                else:
                    reply = {"ok": True, "result": handler(request)}
            except VmrunError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the caller hears of it; we keep serving
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {exc!r}"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        close_listener(self._listener)
        self.path.unlink(missing_ok=True)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket nobody serves any more at `path`; refuse anything else there (a
    file of someone's, or a socket another process still serves)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket: not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except TimeoutError:
            pass  # a listener too busy to accept: served all the same
        except OSError:
            path.unlink(missing_ok=True)  # nobody listens: left by a process that died
            return
    raise ControlError(f"{path} is served by another process already")


def control_call(path: Path, op: str, timeout: float = 120.0, **arguments: object) -> object:
    """Ask the process serving the control socket `path` (a sandbox, the pool) to do `op`;
    its result, or ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
            reply = json.loads(read_line(conn, _MAX_REQUEST) or b"null")
        except (OSError, ValueError) as exc:
            raise ControlError(f"cannot reach {path}: {exc}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ControlError(str(reply.get("error") if isinstance(reply, dict) else "no reply"))
    return reply.get("result")
