import os
import subprocess

import pytest

from vmrun.errors import ContainerExistsError, ContainerNotFoundError, InvalidIdError
from vmrun.state import ContainerState, StateStore


def test_create_load_list_remove(tmp_path):
    store = StateStore(tmp_path / "root")
    state = ContainerState("c1", "/b", "/b/rootfs", "running", pid=os.getpid(), annotations={"a": "b"})
    store.create(state)
    loaded = store.load("c1")
    assert loaded == state
    doc = loaded.runc_json()
    assert set(doc) == {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "annotations", "owner"}
    assert doc["status"] == "running"
    assert [s.id for s in store.list()] == ["c1"]
    with pytest.raises(ContainerExistsError):
        store.create(state)
    store.remove("c1")
    with pytest.raises(ContainerNotFoundError):
        store.load("c1")
    assert not (tmp_path / "root" / "c1").exists()


def test_dead_process_reads_as_stopped(tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    state = ContainerState("c2", "/b", "/b/rootfs", "running", pid=child.pid)
    assert state.live_status() == "stopped"


def test_ids_cannot_escape_the_root(tmp_path):
    store = StateStore(tmp_path / "root")
    with pytest.raises(InvalidIdError):
        store.load("../etc")
