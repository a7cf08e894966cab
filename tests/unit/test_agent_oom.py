"""OOM kills read from a cgroup's memory.events, and watched for subscribers."""

from __future__ import annotations

import threading
import time

from vmrun.agent.oom import OomWatch, oom_kills


def _events(cgroup, kills: int) -> None:
    (cgroup / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {kills}\noom_group_kill 0\n")


def test_oom_kills_of_a_cgroup(tmp_path):
    _events(tmp_path, 2)
    assert oom_kills(tmp_path) == 2
    assert oom_kills(tmp_path / "gone") == 0 and oom_kills(None) == 0


def test_a_subscriber_hears_each_rise_and_the_poll_stops_with_it(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for cgroup in (first, second):
        cgroup.mkdir()
        _events(cgroup, 1)  # kills before the watch began are no news
    watch = OomWatch(lambda: {"a": first, "b": second})
    stop = threading.Event()
    heard: list[tuple[str, int]] = []
    listener = threading.Thread(target=lambda: heard.extend(watch.subscribe(lambda: not stop.is_set())))
    listener.start()
    time.sleep(0.2)
    _events(second, 2)
    deadline = time.monotonic() + 5
    while not heard and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    listener.join(5)
    assert heard == [("b", 2)]
    time.sleep(1.2)
    assert not any(t.name == "oom-watch" for t in threading.enumerate()), "the poll outlived its subscribers"
