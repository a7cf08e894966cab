"""`vmrun env`: TOML from a TOML writer (JSON with --json), with the versions of what vmrun
runs, and a [config] part that is a valid vmrun.toml."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from vmrun.bootfiles import guest_versions, kernel_release
from vmrun.config import Config, config_from_dict, load_config

COMPONENTS = {"vmrun", "qemu", "virtiofsd", "guest_kernel", "guest_image"}


def vmrun(*args, env):
    return subprocess.run([sys.executable, "-m", "vmrun.cli", *args], capture_output=True, text=True, env=env)


def _config(tmp_path, text: str) -> dict[str, str]:
    path = tmp_path / "vmrun.toml"
    path.write_text(text)
    return {**os.environ, "VMRUN_CONFIG": str(path)}


def test_env_round_trips(tmp_path):
    env = _config(tmp_path, f'vcpus = 3\nmemory-mib = 256\nboot_timeout = 5\nrun_dir = "/run/vmrun-env-test"\n'  # not made
                            'kernel_params = "quiet \\"x\\""\n')
    result = vmrun("env", env=env)
    assert result.returncode == 0, result.stderr
    doc = tomllib.loads(result.stdout)
    assert doc["config_file"] == env["VMRUN_CONFIG"]
    config = config_from_dict(doc["config"])
    assert config == load_config(Path(env["VMRUN_CONFIG"]))
    assert (config.vcpus, config.memory_mib, config.boot_timeout) == (3, 256, 5.0)
    assert config.kernel_params == 'quiet "x"'
    # ... and as a config file of its own.
    again = tmp_path / "again.toml"
    again.write_text(_config_part(result.stdout))
    assert load_config(again) == config


def _config_part(text: str) -> str:
    import tomli_w

    return tomli_w.dumps(tomllib.loads(text)["config"])


def test_env_json_is_the_same(tmp_path):
    env = _config(tmp_path, "vcpus = 2\n")
    as_toml = vmrun("env", env=env)
    as_json = vmrun("env", "--json", env=env)
    assert as_toml.returncode == 0 and as_json.returncode == 0
    toml_doc, json_doc = tomllib.loads(as_toml.stdout), json.loads(as_json.stdout)
    # Versions are asked of the tools each time: compare all but their free-form detail.
    assert toml_doc["config"] == json_doc["config"] and toml_doc["config_file"] == json_doc["config_file"]
    assert {k: v["version"] for k, v in toml_doc["versions"].items()} == \
        {k: v["version"] for k, v in json_doc["versions"].items()}


def test_env_reports_versions_and_what_is_missing(tmp_path):
    env = _config(tmp_path, f'qemu = "/nonexistent/qemu"\nvirtiofsd = "/nonexistent/virtiofsd"\n'
                            f'image_dir = "{tmp_path}/no-image"\n')
    result = vmrun("env", env=env)
    assert result.returncode == 0, result.stderr
    versions = tomllib.loads(result.stdout)["versions"]
    assert set(versions) == COMPONENTS
    import vmrun as package

    assert versions["vmrun"] == {"found": True, "version": package.__version__, "detail": versions["vmrun"]["detail"]}
    for name in ("qemu", "virtiofsd", "guest_kernel", "guest_image"):
        assert versions[name]["found"] is False and versions[name]["version"] == ""
        assert versions[name]["detail"]
    assert "/nonexistent/qemu" in versions["qemu"]["detail"]
    assert "vmrun image build" in versions["guest_image"]["detail"]


def test_env_finds_qemu_by_its_version_line(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 9.1.2 (v9.1.2)'\necho 'Copyright'\n")
    fake.chmod(0o755)
    result = vmrun("env", "--json", env=_config(tmp_path, f'qemu = "{fake}"\n'))
    qemu = json.loads(result.stdout)["versions"]["qemu"]
    assert qemu["found"] is True and qemu["version"] == "9.1.2"


def test_guest_versions_of_a_built_image(tmp_path):
    image = tmp_path / "image" / "abc123"
    image.mkdir(parents=True)
    (image / "vmlinux").write_bytes(b"\0" * 100 + b"Linux version 6.1.0-9-amd64 (x@y) #1 SMP\0")
    (image / "initrd.img").write_bytes(b"initrd")
    (image / "root.erofs").write_bytes(b"root")
    (image / "manifest.json").write_text(json.dumps({
        "files": {"kernel": "vmlinux", "initrd": "initrd.img", "root": "root.erofs"}, "built_at": "2026-01-01T00:00:00Z",
        "kernel": {"package": "linux-image-6.1.0-9-amd64", "release": "6.1.0-9-amd64", "version": "6.1.1-1"}}))
    (tmp_path / "image" / "current").symlink_to("abc123")
    found = guest_versions(Config(image_dir=tmp_path / "image"))
    assert (found.kernel, found.image) == ("6.1.0-9-amd64", "abc123")


def test_kernel_release_from_a_bzimage_header_or_a_banner(tmp_path):
    bzimage = bytearray(0x1000)
    bzimage[0x202:0x206] = b"HdrS"
    bzimage[0x20E:0x210] = (0x600 - 0x200).to_bytes(2, "little")
    bzimage[0x600:0x620] = b"6.12.1-custom (me@host) #2\0"
    (tmp_path / "bzImage").write_bytes(bytes(bzimage))
    assert kernel_release(tmp_path / "bzImage") == "6.12.1-custom"
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 5000 + b"Linux version 6.1.0-57-cloud-amd64 (d)")
    assert kernel_release(tmp_path / "vmlinux") == "6.1.0-57-cloud-amd64"
    (tmp_path / "empty").write_bytes(b"")
    assert kernel_release(tmp_path / "empty") is None
    assert kernel_release(tmp_path / "absent") is None


def test_configured_kernel_has_no_image_id(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"Linux version 5.10.0-x (a)")
    found = guest_versions(Config(kernel=str(kernel), initrd=str(tmp_path / "i")))
    assert found.kernel == "5.10.0-x" and found.image is None and "configured" in found.image_detail
