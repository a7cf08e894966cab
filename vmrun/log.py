"""runc-style logging: logfmt text (runc's default) or JSON lines ({"level","msg","time"},
with --log-format json), to --log or stderr.

containerd's shim passes --log-format json and shows its user the last "level":"error" line
of the --log file, so every error vmrun reports goes there as one line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from vmrun.errors import VmrunError

_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "fatal"}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": _LEVELS.get(record.levelno, "info"), "msg": record.getMessage(),
                           "time": _time(record)})


class TextFormatter(logging.Formatter):
    """logrus's text format, as runc writes it: time="..." level=... msg="..."."""

    def format(self, record: logging.LogRecord) -> str:
        # Quoted as Go's %q would: one line whatever the message holds.
        message = json.dumps(record.getMessage(), ensure_ascii=False)
        return f'time="{_time(record)}" level={_LEVELS.get(record.levelno, "info")} msg={message}'


def setup_logging(log_path: str | None, log_format: str, debug: bool) -> bool:
    """Configure the `vmrun` logger; True when it writes to a file rather than stderr."""
    logger = logging.getLogger("vmrun")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if log_path:
        try:
            handler: logging.Handler = logging.FileHandler(log_path)
        except OSError as exc:
            # As runc: a command whose log cannot be written fails, before it does anything.
            raise VmrunError(f"cannot open log file {log_path}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
        # Without --log, stderr only shows problems unless --debug asks for more.
        handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    return bool(log_path)


def debugging() -> bool:
    """Whether this process logs debug lines (--debug): the helpers it starts then do too."""
    return logging.getLogger("vmrun").isEnabledFor(logging.DEBUG)
