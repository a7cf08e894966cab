"""Which container specs take the agent's spare network namespace (pure logic)."""

from vmrun.agent.spare_netns import SpareNetns


def ready_spare(tmp_path) -> SpareNetns:
    spare = SpareNetns(str(tmp_path / "spare"))
    spare._ready = True  # as make() leaves it; making one needs root in a guest
    return spare


def spec(*namespaces: dict) -> dict:
    return {"process": {}, "linux": {"namespaces": list(namespaces)}}


def test_a_new_network_namespace_takes_the_spare_once(tmp_path):
    spare = ready_spare(tmp_path)
    first, second = spec({"type": "pid"}, {"type": "network"}), spec({"type": "network"})
    assert spare.offer(first)
    assert first["linux"]["namespaces"] == [{"type": "pid"}, {"type": "network", "path": spare.path}]
    assert not spare.offer(second)
    assert second["linux"]["namespaces"] == [{"type": "network"}]


def test_specs_that_ask_for_no_new_network_namespace_leave_it(tmp_path):
    spare = ready_spare(tmp_path)
    joining = spec({"type": "network", "path": "/proc/1/ns/net"})
    for other in (joining, spec({"type": "pid"}), {"process": {}}, {"linux": None}, {"linux": {"namespaces": "x"}}):
        before = repr(other)
        assert not spare.offer(other)
        assert repr(other) == before
    assert spare.offer(spec({"type": "network"}))  # still there for one that does


def test_no_spare_until_made(tmp_path):
    unmade = SpareNetns(str(tmp_path / "spare"))
    request = spec({"type": "network"})
    assert not unmade.offer(request)
    assert request["linux"]["namespaces"] == [{"type": "network"}]
