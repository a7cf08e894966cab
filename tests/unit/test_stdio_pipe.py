"""The relay widens a pipe on its stdin so that each read can fill a frame."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from vmrun import stdio
from vmrun.stdio import _STDIN_PIPE_SIZE, _widen_pipe


def test_a_default_pipe_grows_to_a_megabyte() -> None:
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < _STDIN_PIPE_SIZE
        _widen_pipe(r)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) >= _STDIN_PIPE_SIZE
        os.write(w, b"x" * (256 << 10))  # a whole frame fits now, without a reader
        assert len(os.read(r, 1 << 20)) == 256 << 10
    finally:
        os.close(r)
        os.close(w)


def test_a_larger_pipe_is_not_shrunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stdio, "_STDIN_PIPE_SIZE", 128 << 10)
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 1 << 20)
        _widen_pipe(r)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        os.close(r)
        os.close(w)


def test_files_and_closed_fds_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    try:
        _widen_pipe(fd)
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)
    _widen_pipe(fd)  # closed: nothing to do, no error
