"""The vsock backend's log: rate-limited lines, a size-capped file."""

from __future__ import annotations

import logging
import os

import pytest

from vmrun.hypervisor.vsock.vhost_user import logs
from vmrun.hypervisor.vsock.vhost_user.logs import BoundedLogHandler, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "test", "levelno": level,
                                  "levelname": logging.getLevelName(level), "msg": msg})


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "backend.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # as HelperProcess
    yield path, fd
    os.close(fd)


def test_rate_limiter_lets_a_burst_through_per_window():
    clock = Clock()
    limiter = RateLimiter(burst=3, window=10.0, clock=clock)
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
    clock.now += 9.9
    assert not limiter.allow()
    clock.now += 0.1
    assert limiter.allow()
    assert limiter.take_suppressed() == 3 and limiter.take_suppressed() == 0


def test_handler_drops_past_the_burst_and_says_how_many(log_file):
    path, fd = log_file
    clock = Clock()
    handler = BoundedLogHandler(fd, RateLimiter(burst=5, window=10.0, clock=clock))
    for i in range(1000):
        handler.handle(record(f"flood {i}"))
    lines = path.read_text().splitlines()
    assert lines == [f"flood {i}" for i in range(5)]
    clock.now += 10
    handler.handle(record("later"))
    lines = path.read_text().splitlines()
    assert lines[5:] == ["suppressed 995 log messages (at most 5 per 10s)", "later"]
    for _ in range(10):
        handler.handle(record("again"))
    handler.close()  # what the last window dropped is said on the way out
    assert path.read_text().splitlines()[-1] == "suppressed 6 log messages"


def test_handler_keeps_the_file_under_its_cap_with_the_start_up_lines(log_file):
    path, fd = log_file
    handler = BoundedLogHandler(fd, None, max_bytes=4096)
    handler.handle(record("listening: the start-up line"))
    handler.mark_head()
    for i in range(2000):
        handler.handle(record(f"line {i:05d} " + "x" * 50))
        assert path.stat().st_size <= 4096
    lines = path.read_text().splitlines()
    assert lines[0] == "listening: the start-up line"
    assert lines[1].startswith(f"log cut #{handler.cuts}: lines after start-up dropped")
    assert handler.cuts > 1
    assert lines[-1].startswith("line 01999 ")  # the newest lines are kept


def test_handler_bounds_one_record(log_file):
    path, fd = log_file
    handler = BoundedLogHandler(fd, None)
    handler.handle(record("y" * 100_000))
    assert path.stat().st_size <= logs.MAX_RECORD_BYTES


def test_handler_on_a_pipe_writes_and_does_not_cap():
    r, w = os.pipe()
    try:
        handler = BoundedLogHandler(w, None, max_bytes=10)
        handler.handle(record("more than ten bytes"))
        assert os.read(r, 100) == b"more than ten bytes\n"
    finally:
        os.close(r)
        os.close(w)


def test_configure_routes_everything_through_one_bounded_handler(log_file):
    path, fd = log_file
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handler = logs.configure(verbose=False, fd=fd)
        assert root.handlers == [handler] and root.level == logging.INFO
        assert handler.limiter is not None and handler.max_bytes == logs.LOG_MAX_BYTES
        logging.getLogger("vmrun.hypervisor.vsock.vhost_user.backend").debug("per packet")
        logging.getLogger("vmrun.hypervisor.vsock.vhost_user.backend").info("once")
        text = path.read_text()
        assert "per packet" not in text and "INFO once" in text
        assert logs.configure(verbose=True, fd=fd).limiter is None
        assert root.level == logging.DEBUG
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
