"""`kill` when the guest goes with the container it signalled."""

import subprocess
from contextlib import contextmanager

import pytest

from vmrun import containers as containers_module
from vmrun.agent.client import AgentClient
from vmrun.config import Config
from vmrun.containers import Containers
from vmrun.errors import AgentGoneError
from vmrun.process_ref import ProcessRef
from vmrun.state import ContainerState, StateStore


class GuestThatGoes:
    """An agent whose guest is torn down while it answers: the call breaks."""

    def __init__(self, on_signal):
        self.on_signal = on_signal

    def signal_process(self, container_id, signum, exec_id="", all_processes=False):
        self.on_signal()
        raise AgentGoneError("agent: Stream removed (Socket closed)")


@pytest.fixture
def shim(tmp_path):
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def _containers(tmp_path, shim, monkeypatch, on_signal):
    store = StateStore(tmp_path / "root")
    state = ContainerState("victim", "/b", "/b/rootfs", "running")
    state.process = ProcessRef.of(shim.pid)
    store.create(state)

    @contextmanager
    def agent(self, state):
        yield GuestThatGoes(on_signal)

    monkeypatch.setattr(Containers, "_agent", agent)
    return Containers(Config(), store)


def test_kill_succeeds_when_the_guest_goes_with_the_container(tmp_path, shim, monkeypatch):
    def container_dies():
        shim.kill()
        shim.wait()

    _containers(tmp_path, shim, monkeypatch, container_dies).kill("victim", 9)


def test_kill_fails_when_the_guest_goes_but_the_container_stays(tmp_path, shim, monkeypatch):
    monkeypatch.setattr(containers_module, "KILLED_GUEST_GRACE_S", 0.2)
    with pytest.raises(AgentGoneError):
        _containers(tmp_path, shim, monkeypatch, lambda: None).kill("victim", 9)


def test_an_agent_that_cannot_be_reached_reads_as_gone(tmp_path):
    with AgentClient(str(tmp_path / "no-such-socket"), call_timeout=5.0) as agent, pytest.raises(AgentGoneError):
        agent.health()
