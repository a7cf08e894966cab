import dataclasses
import json
import os

import pytest

from guest import build
from guest.build import GuestImage, KeyInputs, compute_key, find_image, tree_digest
from guest.debs import Package
from guest.python_tree import AgentSources
from vmrun.errors import ImageError

BASE = KeyInputs(
    packages={"linux-image-6.1.0-57-cloud-amd64": "6.1.192-3", "crun": "1.8.1-1+deb12u1"},
    wheels={"grpcio": "1.85.3", "protobuf": "7.36.2"},
    guest_files="g" * 64,
    agent="a" * 64,
)


def test_key_is_stable_and_order_independent():
    same = KeyInputs(
        packages=dict(reversed(list(BASE.packages.items()))),
        wheels=dict(BASE.wheels),
        guest_files=BASE.guest_files,
        agent=BASE.agent,
    )
    assert compute_key(BASE) == compute_key(same)
    assert len(compute_key(BASE)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"packages": {**BASE.packages, "crun": "1.8.1-1+deb12u2"}},
        {"packages": {**BASE.packages, "libfoo1": "1.0"}},
        {"wheels": {**BASE.wheels, "grpcio": "1.85.4"}},
        {"guest_files": "h" * 64},
        {"agent": "b" * 64},
        {"builder_version": BASE.builder_version + 1},
    ],
)
def test_key_changes_with_every_input(change):
    assert compute_key(dataclasses.replace(BASE, **change)) != compute_key(BASE)


def test_tree_digest_ignores_bytecode_but_not_content(tmp_path):
    (tmp_path / "initrd").mkdir()
    (tmp_path / "initrd/init").write_text("#!/bin/sh\n")
    (tmp_path / "build.py").write_text("x = 1\n")
    digest = tree_digest(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__/build.cpython-311.pyc").write_bytes(b"junk")
    assert tree_digest(tmp_path) == digest
    (tmp_path / "initrd/init").write_text("#!/bin/sh\necho changed\n")
    assert tree_digest(tmp_path) != digest
    (tmp_path / "initrd/init").write_text("#!/bin/sh\n")
    (tmp_path / "initrd/init").rename(tmp_path / "initrd/init2")
    assert tree_digest(tmp_path) != digest


def _fake_plan(tmp_path, key_agent="a" * 64):
    inputs = dataclasses.replace(BASE, agent=key_agent)
    agent = AgentSources(tmp_path, ())
    pkgs = {n: Package(n, v) for n, v in inputs.packages.items()}
    return build.Plan(inputs, compute_key(inputs), pkgs, "linux-image-6.1.0-57-cloud-amd64", agent)


def _fake_build(plan, cache_dir, work, log, start):
    out = work / "out"
    out.mkdir()
    (out / "vmlinux").write_bytes(b"K" * 10)
    (out / "initrd.img").write_bytes(b"I" * 5)
    (out / "root.erofs").write_bytes(b"R" * 3)
    manifest = {"key": plan.key, "files": {"kernel": "vmlinux", "initrd": "initrd.img", "root": "root.erofs"},
                "kernel": {"boot": "pvh"}, "sizes": {"tree_bytes": 1, "root": 3}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def fake_builder(tmp_path, monkeypatch):
    state = {"plan": _fake_plan(tmp_path), "builds": 0}

    def make_plan(cache_dir, log, kernel_source="vmrun"):
        return state["plan"]

    def counting_build(*args):
        state["builds"] += 1
        return _fake_build(*args)

    monkeypatch.setattr(build, "make_plan", make_plan)
    monkeypatch.setattr(build, "_build", counting_build)
    monkeypatch.setattr(build.os, "geteuid", lambda: 0)
    return state


def test_build_then_cache_hit_then_rebuild_on_change(tmp_path, fake_builder):
    cache = tmp_path / "cache"
    assert find_image(cache) is None
    image, hit, seconds = build.build_image(cache, log=lambda m: None)
    assert not hit and fake_builder["builds"] == 1
    assert image.kernel == cache / image.key / "vmlinux"
    assert image.size_bytes == 18 and image.root == cache / image.key / "root.erofs"
    assert find_image(cache) == image
    again, hit, seconds = build.build_image(cache, log=lambda m: None)
    assert hit and again == image and fake_builder["builds"] == 1
    forced, hit, _ = build.build_image(cache, force=True, log=lambda m: None)
    assert not hit and forced.key == image.key and fake_builder["builds"] == 2
    fake_builder["plan"] = _fake_plan(tmp_path, key_agent="c" * 64)
    new, hit, _ = build.build_image(cache, log=lambda m: None)
    assert not hit and new.key != image.key
    assert find_image(cache).key == new.key
    assert not [p for p in cache.iterdir() if p.name.startswith((".build-", ".old-", ".current-"))]


def test_failed_build_leaves_nothing(tmp_path, fake_builder, monkeypatch):
    cache = tmp_path / "cache"

    def failing(plan, cache_dir, work, log, start):
        (work / "root" / "usr").mkdir(parents=True)
        raise ImageError("cannot download Debian package crun: boom")

    monkeypatch.setattr(build, "_build", failing)
    with pytest.raises(ImageError, match="crun: boom"):
        build.build_image(cache, log=lambda m: None)
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]
    assert find_image(cache) is None


def test_find_image_tolerates_broken_state(tmp_path):
    assert find_image(tmp_path) is None
    os.symlink("0123456789abcdef", tmp_path / "current")
    assert find_image(tmp_path) is None  # dangling pointer
    (tmp_path / "0123456789abcdef").mkdir()
    (tmp_path / "0123456789abcdef/manifest.json").write_text("{not json")
    assert find_image(tmp_path) is None
    (tmp_path / "0123456789abcdef/manifest.json").write_text(
        json.dumps({"files": {"kernel": "vmlinux", "initrd": "initrd.img"}})
    )
    (tmp_path / "0123456789abcdef/vmlinux").write_bytes(b"k")
    (tmp_path / "0123456789abcdef/initrd.img").write_bytes(b"i")
    assert find_image(tmp_path) is None  # an image from before the root image: rebuilt
    (tmp_path / "0123456789abcdef/manifest.json").write_text(
        json.dumps({"files": {"kernel": "vmlinux", "initrd": "initrd.img", "root": "root.erofs"}})
    )
    assert find_image(tmp_path) is None  # files missing
    (tmp_path / "0123456789abcdef/root.erofs").write_bytes(b"r")
    image = find_image(tmp_path)
    assert isinstance(image, GuestImage) and image.key == "0123456789abcdef"


def test_old_images_are_pruned(tmp_path, fake_builder):
    cache = tmp_path / "cache"
    keys = []
    for agent in "abcd":
        fake_builder["plan"] = _fake_plan(tmp_path, key_agent=agent * 64)
        keys.append(build.build_image(cache, log=lambda m: None)[0].key)
    remaining = {p.name for p in cache.iterdir() if build.KEY_RE.fullmatch(p.name)}
    assert keys[-1] in remaining and len(remaining) == build.KEEP_IMAGES


def test_package_list_covers_the_essentials():
    for name in ("busybox-static", "python3.11-minimal", "libpython3.11-stdlib", "crun", "libstdc++6", "libc6"):
        assert name in build.PACKAGES
    assert build.INIT_SCRIPT.read_text().startswith("#!/bin/busybox sh")
    assert build.MODULES_LIST.exists()


@pytest.mark.parametrize("kernel_source, package, builds", [
    ("vmrun", "linux-source-6.1", True),
    ("debian", "linux-image-6.1.0-57-cloud-amd64", False),
])
def test_the_plan_takes_the_kernel_it_is_asked_for(tmp_path, monkeypatch, kernel_source, package, builds):
    """Our kernel is built from the linux-source package; Debian's comes from the package
    the cloud meta package names. Either way its version is part of the image's key."""
    monkeypatch.setattr(build.debs, "ensure_lists", lambda log: None)
    monkeypatch.setattr(build.debs, "policy_versions", lambda names, apt_dir=None: {n: "1" for n in names})
    monkeypatch.setattr(build, "_kernel_package_name", lambda apt_dir, versions: "linux-image-6.1.0-57-cloud-amd64")
    monkeypatch.setattr(build.python_tree, "host_versions", lambda: {"grpcio": "1"})
    monkeypatch.setattr(build.python_tree, "agent_sources", lambda: AgentSources(tmp_path, ()))
    plan = build.make_plan(tmp_path, lambda m: None, kernel_source)
    assert plan.kernel_package == package and plan.builds_kernel is builds
    assert package in plan.inputs.packages and build.KERNEL_META not in plan.inputs.packages
