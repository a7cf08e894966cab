"""TemplateStore's locking: a template is not replaced or removed while a clone copies it; and
what makes a saved template stale."""

from __future__ import annotations

import json
import threading
import time

import pytest

from vmrun.bootfiles import BootFiles
from vmrun.errors import ConfigError
from vmrun.hypervisor.accel import Acceleration
from vmrun.hypervisor.templates import Template, TemplateDefinition, TemplateStore, fingerprint


def make_template(store: TemplateStore, name: str, content: str) -> Template:
    path = store.root / name
    path.mkdir(parents=True)
    (path / "memory").write_text(content)
    (path / "state").write_text(content)
    (path / "record.json").write_text(json.dumps({"name": name, "fingerprint": {}}))
    return Template(path)


def test_remove_waits_until_no_clone_copies_the_template(tmp_path):
    store = TemplateStore(tmp_path)
    make_template(store, "default", "v1")
    removed = threading.Event()

    with store.in_use("default"):
        remover = threading.Thread(target=lambda: store.remove("default") and removed.set())
        remover.start()
        time.sleep(0.3)
        # Still there, whole, while the clone holds it.
        assert not removed.is_set()
        assert (tmp_path / "default" / "memory").read_text() == "v1"
    remover.join(5)
    assert removed.is_set() and store.get("default") is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith((".lock", ".build"))] == []


def test_clones_share_the_template(tmp_path):
    store = TemplateStore(tmp_path)
    make_template(store, "default", "v1")
    entered = threading.Event()

    def second_clone() -> None:
        with store.in_use("default"):
            entered.set()

    with store.in_use("default"):
        other = threading.Thread(target=second_clone)
        other.start()
        assert entered.wait(5), "a second clone must not wait for the first"
    other.join(5)


def test_builders_take_turns(tmp_path):
    store = TemplateStore(tmp_path)
    order: list[str] = []

    def build(name: str) -> None:
        with store.building("default"):
            order.append(f"{name} start")
            time.sleep(0.2)
            order.append(f"{name} end")

    threads = [threading.Thread(target=build, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(order) == 4 and order[0].split()[0] == order[1].split()[0]
    assert order[2].split()[0] == order[3].split()[0]


def test_a_template_made_for_another_kernel_command_line_is_stale(tmp_path):
    # The agent's warm-up is asked for on the command line, under TCG only; a template's
    # clones keep its command line, so it is part of what the template was built from.
    definition = TemplateDefinition(name="default", vcpus=2)
    tcg, kvm = Acceleration("tcg", "test"), Acceleration("kvm", "test")
    assert "vmrun.warm_up=1" in definition.kernel_command_line(tcg).split()
    assert "vmrun.warm_up=1" not in definition.kernel_command_line(kvm).split()
    for name in ("qemu", "vmlinux", "initrd"):
        (tmp_path / name).write_text(name)
    expected = fingerprint(definition, str(tmp_path / "qemu"), BootFiles(tmp_path / "vmlinux", tmp_path / "initrd"), tcg)
    assert expected["kernel_command_line"] == definition.kernel_command_line(tcg)
    store = TemplateStore(tmp_path / "templates")
    template = make_template(store, "default", "v1")
    older = {**expected, "kernel_command_line": expected["kernel_command_line"].replace(" vmrun.warm_up=1", "")}
    template.record_path.write_text(json.dumps({"name": "default", "fingerprint": older}))
    assert template.why_unusable(expected) == "it was built from another kernel_command_line"
    template.record_path.write_text(json.dumps({"name": "default", "fingerprint": expected}))
    assert template.why_unusable(expected) == ""



@pytest.mark.parametrize("name", ["./../victim", "..", ".", "", "a/b", "/tmp/x", ".hidden"])
def test_a_template_name_is_never_a_path(tmp_path, name):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "data").write_text("someone's")
    store = TemplateStore(tmp_path / "templates")
    for attempt in (lambda: store.remove(name), lambda: store.get(name), lambda: TemplateDefinition.load(name),
                    lambda: store.building(name).__enter__()):
        with pytest.raises(ConfigError, match="invalid template name"):
            attempt()
    assert (tmp_path / "victim" / "data").read_text() == "someone's"
    assert not (tmp_path / "templates").exists()  # not even a lock file made for it


@pytest.mark.parametrize("text, message", [
    ("vcpus = 0", "vcpus must be >= 1"),
    ("vcpus = true", "vcpus must be an integer, not a boolean"),
    ("vcpus = 1.5", "vcpus must be an integer, not a float"),
    ('vcpus = "2"', "vcpus must be an integer, not a string"),
    ("memory_mib = -5", "memory_mib must be >= 64"),
    ("hotplug_ports = 1", "hotplug_ports must be >= 2"),
    ("hotplug_ports = 100000", "hotplug_ports must be <= 32"),
    ('kernel_params = ["a", "b"]', "kernel_params must be a string, not an array"),
    ('kernel_params = "a\\nb"', "kernel_params must not hold NUL or newline"),
    ("nope = 1", "unknown setting 'nope'"),
    ("vcpus = 4\nmax_vcpus = 2", "max_vcpus and max_memory_mib must be at least"),
])
def test_a_template_definition_is_checked_as_vmrun_toml_is(tmp_path, text, message):
    (tmp_path / "t.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as caught:
        TemplateDefinition.load("t", tmp_path)
    assert "\n" not in str(caught.value)


def test_a_template_definition_that_is_not_utf8_is_one_line_error(tmp_path):
    (tmp_path / "t.toml").write_bytes(b"vcpus = 2 # \xff\n")
    with pytest.raises(ConfigError, match="template definition .*t.toml"):
        TemplateDefinition.load("t", tmp_path)
