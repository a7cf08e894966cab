"""Tiny OCI images built offline from Debian's busybox-static, with the stdlib only.

One gzip layer holds /bin/busybox, a symlink per applet, /etc/passwd and /etc/group and
the usual empty directories. From it this writes an OCI image layout tar (what
`ctr image import` and `podman load` take; its index names the image with the
`io.containerd.image.name` and `org.opencontainers.image.ref.name` annotations) and a
docker-archive tar (`manifest.json` with RepoTags: `docker load`, `ctr image import`).

Everything is deterministic: fixed times, owners and order, gzip without a name or a
time, so the same busybox gives the same digests.

    python3 tests/clients/images.py bbx:latest bbx-oci.tar bbx-docker.tar            # CMD /bin/sh
    python3 tests/clients/images.py pause:1 pause-oci.tar pause-docker.tar /bin/sleep infinity
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
# Every file in the images has this time (2000-01-01T00:00:00Z): no build time leaks in.
EPOCH = 946684800
CREATED = "2000-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

PAUSE_CMD = ("/bin/sleep", "infinity")

_DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o755, "root": 0o700, "sys": 0o755,
         "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "sbin": 0o755, "var": 0o755}
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _info(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _TarWriter:
    """A tar in memory, written in the order given (callers give a sorted order)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(_info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.tar.addfile(_info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        self.tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, linkname=target))

    def close(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], check=True, capture_output=True).stdout.decode()
    return sorted({name for name in out.split() if name and name != "busybox" and "/" not in name})


def layer_tar(busybox: Path = BUSYBOX) -> bytes:
    """The uncompressed layer: busybox, its applets, passwd/group, empty system dirs."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} not found: install busybox-static")
    data = busybox.read_bytes()
    tar = _TarWriter()
    entries: list[tuple[str, tuple]] = [(d, ("dir", mode)) for d, mode in _DIRS.items()]
    entries.append(("bin/busybox", ("file", data, 0o755)))
    for applet in busybox_applets(busybox):
        entries.append((f"bin/{applet}", ("link", "busybox")))
    entries.append(("etc/passwd", ("file", _PASSWD.encode(), 0o644)))
    entries.append(("etc/group", ("file", _GROUP.encode(), 0o644)))
    for name, entry in sorted(entries):
        if entry[0] == "dir":
            tar.directory(name, entry[1])
        elif entry[0] == "file":
            tar.file(name, entry[1], entry[2])
        else:
            tar.symlink(name, entry[1])
    return tar.close()


def gzip_deterministic(data: bytes) -> bytes:
    out = io.BytesIO()
    # No file name, time 0: the same input always gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as stream:
        stream.write(data)
    return out.getvalue()


def normalize_name(ref: str) -> tuple[str, str]:
    """("docker.io/library/bbx:latest", "latest") for "bbx:latest", as docker names it."""
    name, tag = ref, "latest"
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}"
    return f"{name}:{tag}", tag


@dataclass(frozen=True)
class Image:
    """The blobs of one single-layer image."""

    ref: str  # as given, e.g. "bbx:latest"
    layer: bytes  # the uncompressed tar
    layer_gz: bytes
    config: bytes
    manifest: bytes

    @property
    def full_name(self) -> str:
        return normalize_name(self.ref)[0]

    @property
    def tag(self) -> str:
        return normalize_name(self.ref)[1]

    @property
    def diff_id(self) -> str:
        return "sha256:" + _sha256(self.layer)

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + _sha256(self.manifest)


def build_image(ref: str, cmd: list[str] | tuple[str, ...] = ("/bin/sh",), *, busybox: Path = BUSYBOX,
                env: list[str] | None = None, layer: bytes | None = None) -> Image:
    layer = layer if layer is not None else layer_tar(busybox)
    layer_gz = gzip_deterministic(layer)
    config = _json({
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Env": list(env or [PATH_ENV]), "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha256(layer)]},
        "history": [{"created": CREATED, "created_by": "tests/clients/images.py (busybox-static)"}],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": "sha256:" + _sha256(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": "sha256:" + _sha256(layer_gz), "size": len(layer_gz)}],
    })
    return Image(ref, layer, layer_gz, config, manifest)


def oci_archive(image: Image) -> bytes:
    """An OCI image layout as a tar: oci-layout, index.json, blobs/sha256/*."""
    index = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": image.manifest_digest,
            "size": len(image.manifest),
            "annotations": {
                "io.containerd.image.name": image.full_name,
                "org.opencontainers.image.ref.name": image.tag,
            },
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    })
    blobs = {_sha256(blob): blob for blob in (image.layer_gz, image.config, image.manifest)}
    tar = _TarWriter()
    tar.directory("blobs")
    tar.directory("blobs/sha256")
    for digest in sorted(blobs):
        tar.file(f"blobs/sha256/{digest}", blobs[digest])
    tar.file("index.json", index)
    tar.file("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
    return tar.close()


def docker_archive(image: Image) -> bytes:
    """A `docker save` style tar: manifest.json (RepoTags), the config, an uncompressed layer."""
    layer_id = _sha256(image.layer)
    config_name = _sha256(image.config) + ".json"
    short = image.full_name.removeprefix("docker.io/library/").removeprefix("docker.io/")
    name, tag = short.rsplit(":", 1)
    manifest = _json([{"Config": config_name, "RepoTags": [short], "Layers": [f"{layer_id}/layer.tar"]}])
    repositories = _json({name: {tag: layer_id}})
    tar = _TarWriter()
    tar.directory(layer_id)
    tar.file(f"{layer_id}/VERSION", b"1.0")
    tar.file(f"{layer_id}/json", _json({"id": layer_id, "created": CREATED, "os": "linux"}))
    tar.file(f"{layer_id}/layer.tar", image.layer)
    tar.file(config_name, image.config)
    tar.file("manifest.json", manifest)
    tar.file("repositories", repositories)
    return tar.close()


def write_archives(ref: str, oci_tar: Path | str | None, docker_tar: Path | str | None = None,
                   cmd: list[str] | tuple[str, ...] = ("/bin/sh",), *, busybox: Path = BUSYBOX,
                   layer: bytes | None = None) -> Image:
    image = build_image(ref, cmd, busybox=busybox, layer=layer)
    if oci_tar:
        Path(oci_tar).write_bytes(oci_archive(image))
    if docker_tar:
        Path(docker_tar).write_bytes(docker_archive(image))
    return image


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: images.py REF OCI_TAR DOCKER_TAR [CMD...]", file=sys.stderr)
        return 2
    ref, oci_tar, docker_tar, *cmd = argv
    image = write_archives(ref, oci_tar, docker_tar, cmd or ("/bin/sh",))
    print(f"{image.full_name} {image.manifest_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
