"""A log a guest can fill: kept at most twice its limit, the newest output kept."""

from __future__ import annotations

import os
import subprocess
import sys

from vmrun.capped_log import CappedLog
from vmrun.proc import HelperProcess


def test_output_past_the_limit_rotates_once_and_keeps_the_newest(tmp_path):
    path = tmp_path / "console.log"
    log = CappedLog(path, limit=1000)
    for i in range(50):
        os.write(log.write_fd, f"line {i:03}\n".encode() * 10)  # 90 bytes each
    log.close()
    older, newest = (tmp_path / "console.log.1").read_bytes(), path.read_bytes()
    assert len(older) <= 1000 and len(newest) <= 1000
    assert newest.endswith(b"line 049\n")
    assert not (tmp_path / "console.log.2").exists()


def test_a_helper_with_a_limit_writes_through_it_and_its_last_words_are_read(tmp_path):
    path = tmp_path / "helper.log"
    script = "import sys; sys.stdout.write('x' * 5000 + '\\n'); sys.stdout.flush(); sys.stderr.write('the reason\\n')"
    helper = HelperProcess("talker", [sys.executable, "-c", script], log_path=path, log_limit=2048).start()
    helper.wait(30)
    assert helper.log_tail(1) == "the reason"
    helper.stop()
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert max(sizes) <= 2048 and sum(sizes) >= 2048
