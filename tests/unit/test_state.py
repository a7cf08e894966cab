import json
import os
import stat
import subprocess

import pytest

from vmrun.errors import ContainerExistsError, ContainerNotFoundError, InvalidIdError, VmrunError
from vmrun.process_ref import ProcessRef
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


def test_state_is_private_to_root(tmp_path):
    """The root a store makes, each container's directory and its state.json: 0700/0600,
    whatever the umask lets through."""
    store = StateStore(tmp_path / "parent" / "root")
    old_umask = os.umask(0)
    try:
        store.create(ContainerState("c1", "/b", "/b/rootfs", "created", pid=os.getpid()))
        store.save(store.load("c1"))  # a replaced file too
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "parent" / "root").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "parent" / "root" / "c1").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "parent" / "root" / "c1" / "state.json").stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "parent" / "root" / "c1").iterdir()] == ["state.json"]


def test_an_existing_root_keeps_its_mode(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    StateStore(root).create(ContainerState("c1", "/b", "/b/rootfs", "created", pid=os.getpid()))
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


def test_processes_are_recorded_with_their_start_times(tmp_path):
    store = StateStore(tmp_path / "root")
    store.create(ContainerState("c1", "/b", "/b/rootfs", "creating", pid=os.getpid(), daemon_pid=os.getpid()))
    state = store.load("c1")
    assert state.process == ProcessRef.of(os.getpid()) and state.process.verified
    assert state.daemon == ProcessRef.of(os.getpid())
    with subprocess.Popen(["sleep", "60"]) as shim:
        try:
            state.execs["exec-1"] = ProcessRef.of(shim.pid)
            store.save(state)
            assert store.load("c1").execs == {"exec-1": ProcessRef.of(shim.pid)}
        finally:
            shim.kill()


def test_a_reused_pid_reads_as_stopped(tmp_path):
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            recorded = ProcessRef.of(other.pid)
            state = ContainerState("c3", "/b", "/b/rootfs", "running")
            state.process = ProcessRef(other.pid, recorded.start_time - 1)  # its predecessor's
            assert state.live_status() == "stopped"
            assert state.runc_json()["pid"] == 0
            state.process = recorded
            assert state.live_status() == "running"
        finally:
            other.kill()


def test_a_state_file_without_start_times_still_loads(tmp_path):
    """As an older vmrun wrote it: pids alone, the exec shims' as bare numbers."""
    store = StateStore(tmp_path / "root")
    store.create(ContainerState("c1", "/b", "/b/rootfs", "running", pid=os.getpid()))
    path = tmp_path / "root" / "c1" / "state.json"
    document = json.loads(path.read_text())
    del document["pid_start_time"], document["daemon_start_time"]
    document["execs"] = {"exec-1": os.getpid()}
    path.write_text(json.dumps(document))
    state = store.load("c1")
    assert state.process == ProcessRef(os.getpid()) and not state.process.verified
    assert state.execs == {"exec-1": ProcessRef(os.getpid())}
    assert state.live_status() == "running"  # unknown: the pid is trusted as before
    assert state.runc_json()["pid"] == os.getpid()


def test_list_skips_what_is_no_container_with_a_warning(tmp_path, caplog):
    store = StateStore(tmp_path)
    store.create(ContainerState("good", "/b", "/b/rootfs", "created", pid=os.getpid()))
    (tmp_path / "stray file").write_text("x")  # no valid id
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "state.json").write_text("{not json")
    assert [state.id for state in store.list()] == ["good"]
    assert "stray file" in caplog.text and "damaged" in caplog.text


def test_a_full_disk_leaves_no_entry_holding_the_id(tmp_path, monkeypatch):
    import vmrun.state

    store = StateStore(tmp_path)

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vmrun.state, "write_json_atomic", full)
    with pytest.raises(VmrunError, match="cannot record container 'c1' in .*: No space left on device"):
        store.create(ContainerState("c1", "/b", "/b/rootfs", "creating"))
    assert not (tmp_path / "c1").exists()
    monkeypatch.undo()
    store.create(ContainerState("c1", "/b", "/b/rootfs", "creating"))  # the id is free


def test_a_half_made_entry_is_taken_over_once_old(tmp_path, monkeypatch):
    import vmrun.state

    store = StateStore(tmp_path)
    (tmp_path / "c1").mkdir()  # a create that died between its mkdir and its first save
    with pytest.raises(ContainerExistsError):
        store.create(ContainerState("c1", "/b", "/b/rootfs", "creating"))  # it may still be at work
    monkeypatch.setattr(vmrun.state, "_DEBRIS_AGE", -1.0)
    store.create(ContainerState("c1", "/b", "/b/rootfs", "creating"))
    assert store.load("c1").status == "creating"


def test_an_id_too_long_for_a_file_name_is_an_invalid_id(tmp_path):
    store = StateStore(tmp_path)
    with pytest.raises(InvalidIdError, match="invalid container id"):
        store.create(ContainerState("x" * 256, "/b", "/b/rootfs", "creating"))
    with pytest.raises(InvalidIdError):  # so is every command's, not "File name too long"
        store.load("x" * 256)
    store.create(ContainerState("x" * 255, "/b", "/b/rootfs", "creating"))
    assert store.load("x" * 255).status == "creating"


def test_an_old_state_directory_without_a_state_goes_with_remove_debris(tmp_path, monkeypatch):
    import vmrun.state

    store = StateStore(tmp_path)
    (tmp_path / "c1").mkdir()
    store.remove_debris("c1")
    assert (tmp_path / "c1").is_dir()  # a create may be making it this very moment
    monkeypatch.setattr(vmrun.state, "_DEBRIS_AGE", -1.0)
    store.remove_debris("c1")
    assert not (tmp_path / "c1").exists()
    store.create(ContainerState("c2", "/b", "/b/rootfs", "creating"))
    store.remove_debris("c2")
    assert store.load("c2").status == "creating"  # a container is never debris


def test_a_pid_file_that_cannot_be_written_is_named_as_given(tmp_path):
    from vmrun.state import write_pid_file

    with pytest.raises(VmrunError, match=f"^cannot write pid file {tmp_path}/no/pid: No such file or directory$"):
        write_pid_file(str(tmp_path / "no" / "pid"), 1)
    write_pid_file(str(tmp_path / "pid"), 42)
    assert (tmp_path / "pid").read_text() == "42"
