"""The offline image builder (images.py): deterministic, self-consistent archives. No guest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

import images

pytestmark = pytest.mark.skipif(not images.BUSYBOX.is_file(), reason="busybox-static is not installed")


def _members(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layer():
    return images.layer_tar()


def test_archives_are_deterministic(layer, tmp_path):
    first = images.write_archives("bbx:latest", tmp_path / "a-oci.tar", tmp_path / "a-docker.tar")
    second = images.write_archives("bbx:latest", tmp_path / "b-oci.tar", tmp_path / "b-docker.tar", layer=layer)
    assert first.manifest_digest == second.manifest_digest
    assert (tmp_path / "a-oci.tar").read_bytes() == (tmp_path / "b-oci.tar").read_bytes()
    assert (tmp_path / "a-docker.tar").read_bytes() == (tmp_path / "b-docker.tar").read_bytes()


def test_layer_holds_busybox_applets_and_users(layer):
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode & 0o111
    for applet in ("sh", "sleep", "tty", "kill", "uname", "cat"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert {"etc/passwd", "etc/group"} <= set(members)
    assert {m.mtime for m in members.values()} == {images.EPOCH}
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}


def test_oci_layout_is_consistent(layer):
    image = images.build_image("pause:1", images.PAUSE_CMD, layer=layer)
    files = _members(images.oci_archive(image))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"] == {"io.containerd.image.name": "docker.io/library/pause:1",
                                    "org.opencontainers.image.ref.name": "1"}
    blobs = {name.rsplit("/", 1)[1]: data for name, data in files.items() if name.startswith("blobs/sha256/") and data}
    for digest, data in blobs.items():
        assert _sha(data) == "sha256:" + digest
    manifest = json.loads(blobs[entry["digest"].split(":")[1]])
    assert entry["size"] == len(blobs[entry["digest"].split(":")[1]])
    config = json.loads(blobs[manifest["config"]["digest"].split(":")[1]])
    assert config["config"]["Cmd"] == ["/bin/sleep", "infinity"]
    [layer_desc] = manifest["layers"]
    layer_gz = blobs[layer_desc["digest"].split(":")[1]]
    assert layer_desc["mediaType"] == images.MEDIA_LAYER
    assert config["rootfs"]["diff_ids"] == [_sha(gzip.decompress(layer_gz))]


def test_docker_archive_is_consistent(layer):
    image = images.build_image("bbx:latest", layer=layer)
    files = _members(images.docker_archive(image))
    [entry] = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["bbx:latest"]
    config = json.loads(files[entry["Config"]])
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert config["rootfs"]["diff_ids"] == [_sha(files[entry["Layers"][0]])]


@pytest.mark.parametrize(("ref", "full"), [
    ("bbx", "docker.io/library/bbx:latest"),
    ("bbx:1", "docker.io/library/bbx:1"),
    ("me/bbx:2", "docker.io/me/bbx:2"),
    ("localhost/bbx:3", "localhost/bbx:3"),
    ("registry.example:5000/x/bbx", "registry.example:5000/x/bbx:latest"),
])
def test_names_are_normalized_as_docker_does(ref, full):
    assert images.normalize_name(ref)[0] == full
