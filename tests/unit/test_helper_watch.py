"""The watchers that end a guest when what serves it is gone."""

from __future__ import annotations

import threading

import vmrun.helper_watch as helper_watch


def test_the_first_helper_to_die_is_named_once(monkeypatch):
    monkeypatch.setattr(helper_watch, "_INTERVAL", 0.01)
    alive = {"virtiofsd": True}
    died: list[str] = []
    done = threading.Event()
    watch = helper_watch.HelperWatch({"virtiofsd": lambda: alive["virtiofsd"], "backend": lambda: True},
                                     lambda name: (died.append(name), done.set()))
    alive["virtiofsd"] = False
    assert done.wait(5)
    watch.close()
    assert died == ["virtiofsd"]


def test_a_few_missed_health_calls_in_a_row_end_the_guest(monkeypatch):
    monkeypatch.setattr(helper_watch, "_KEEPALIVE_INTERVAL", 0.01)
    answers = iter([True, False, True, False, False, RuntimeError("deadline exceeded")])
    calls = []

    def healthy() -> bool:
        calls.append(1)
        answer = next(answers, False)
        if isinstance(answer, Exception):
            raise answer
        return answer

    done = threading.Event()
    died: list[str] = []
    keepalive = helper_watch.AgentKeepalive(healthy, lambda name: (died.append(name), done.set()))
    assert done.wait(5)
    keepalive.close()
    # One miss, an answer (the count starts over), then three misses: the sixth call.
    assert died == ["the agent"] and len(calls) == 6


def test_closed_watchers_call_nothing(monkeypatch):
    monkeypatch.setattr(helper_watch, "_KEEPALIVE_INTERVAL", 0.01)
    died: list[str] = []
    keepalive = helper_watch.AgentKeepalive(lambda: True, died.append)
    keepalive.close()
    assert died == []


def test_a_kernel_bug_on_the_console_ends_the_guest_once():
    died: list[str] = []
    watch = helper_watch.ConsoleWatch(died.append)
    watch(b"[    8.9] VFS: Busy inodes after unmount of virtiofs\n[    8.9] kernel B")
    assert died == []
    watch(b"UG at fs/super.c:503!\n")  # the marker split between two chunks
    watch(b"[    9.0] Kernel panic - not syncing: Fatal exception\n")
    assert died == ["the guest kernel"]


def test_warnings_on_the_console_are_no_death():
    died: list[str] = []
    watch = helper_watch.ConsoleWatch(died.append)
    watch(b"WARNING: CPU: 0 PID: 1 at mm/page_alloc.c\nvmrun-agent: listening\n")
    assert died == []


def test_a_corrupt_virtqueue_on_the_console_ends_the_guest():
    died: list[str] = []
    watch = helper_watch.ConsoleWatch(died.append)
    watch(b"[   12.3] virtio_vsock virtio2: tx:id 2 is not a head!\n")
    assert died == ["the guest kernel"]
    other: list[str] = []
    helper_watch.ConsoleWatch(other.append)(b"virtio_blk virtio1: requests.0:id 300 out of range\n")
    assert other == ["the guest kernel"]
