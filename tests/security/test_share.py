"""The share: the guest writes through virtiofsd, and the host must never follow what it
wrote (Kata's CVE-2020-2026 and CVE-2020-2024), nor let it write what is read-only."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from attacker import attacker_bundle
from leftovers import mounts_under

from vmrun.common.constants import SHARED_DIR

# The guest's share, as the attacker's container (in the guest's PID namespace) reaches it.
GUEST_SHARE = f"/proc/1/root{SHARED_DIR}"


def in_pod(bundle: Path, kind: str, *, mounts: list[dict] | None = None) -> Path:
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {"io.kubernetes.cri.container-type": kind, "io.kubernetes.cri.sandbox-id": "pod"}
    spec["mounts"] += mounts or []
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def start_attacker_pod(vm_env) -> None:
    bundle = in_pod(attacker_bundle(vm_env.base / "bundles" / "pod", "exec sleep 600"), "sandbox")
    assert vm_env.vmrun("create", "--bundle", str(bundle), "pod", detached=True).returncode == 0
    assert vm_env.vmrun("start", "pod").returncode == 0


def attack(vm_env, script: str) -> str:
    result = vm_env.vmrun("exec", "pod", "sh", "-c", script)
    return result.stdout.decode() + result.stderr.decode()


def test_links_planted_in_the_share_do_not_redirect_the_next_containers_mounts(vm_env):
    start_attacker_pod(vm_env)
    target = vm_env.base / "host-target"  # any host directory the attacker would mount over
    target.mkdir()
    host_file = vm_env.base / "host-file"
    host_file.write_text("root's\n")
    volume = vm_env.base / "volume"
    volume.mkdir()
    (volume / "data").write_text("volume data\n")
    # The next container's id is predictable (kubelet's, containerd's): plant its place.
    planted = attack(vm_env, f"""
        ln -s {target} {GUEST_SHARE}/victim && echo planted victim
        mkdir -p {GUEST_SHARE}/victim2 && ln -s {target} {GUEST_SHARE}/victim2/mounts && echo planted mounts
        mkdir -p {GUEST_SHARE}/victim3/mounts && ln -s {host_file} {GUEST_SHARE}/victim3/mounts/1 \
            && echo planted mount 1
        true""")
    assert "planted" not in planted, planted
    assert "Read-only file system" in planted, planted

    for victim in ("victim", "victim2", "victim3"):
        bundle = in_pod(vm_env.bundle(victim, ["sleep", "600"]), "container", mounts=[
            {"destination": "/etc/hostname", "type": "bind", "source": str(host_file), "options": ["rbind", "ro"]},
            {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]},
        ])
        assert vm_env.vmrun("create", "--bundle", str(bundle), victim, detached=True).returncode == 0
        assert vm_env.vmrun("start", victim).returncode == 0
        seen = vm_env.vmrun("exec", victim, "cat", "/vol/data")
        assert seen.stdout == b"volume data\n", seen
    assert list(target.iterdir()) == [], "the host made directories where the guest pointed it"
    assert host_file.read_text() == "root's\n"
    assert not mounts_under(target) and not mounts_under(host_file)

    for container in ("victim", "victim2", "victim3", "pod"):
        assert vm_env.vmrun("delete", "--force", container).returncode == 0
    assert not mounts_under(vm_env.base)


def test_the_guest_cannot_swap_a_mounted_directory_for_a_link_before_teardown(vm_env):
    """Cleanup must not follow guest links either (CVE-2020-2024): the guest tries to move
    the container's mount point away and leave a link to a host directory in its place."""
    start_attacker_pod(vm_env)
    bundle = in_pod(vm_env.bundle("victim", ["sleep", "600"]), "container")
    assert vm_env.vmrun("create", "--bundle", str(bundle), "victim", detached=True).returncode == 0
    target = vm_env.base / "host-target"
    (target / "rootfs").mkdir(parents=True)
    (target / "rootfs" / "keep").write_text("keep\n")
    tried = attack(vm_env, f"""
        mv {GUEST_SHARE}/victim/rootfs {GUEST_SHARE}/victim/moved && echo MOVED
        ln -s {target}/rootfs {GUEST_SHARE}/victim/rootfs.new && echo LINKED
        mv {GUEST_SHARE}/victim/rootfs.new {GUEST_SHARE}/victim/rootfs && echo SWAPPED
        true""")
    assert "MOVED" not in tried and "LINKED" not in tried and "SWAPPED" not in tried, tried
    for container in ("victim", "pod"):
        assert vm_env.vmrun("delete", "--force", container).returncode == 0
    assert (target / "rootfs" / "keep").read_text() == "keep\n"
    assert not mounts_under(vm_env.base)


def test_a_read_only_volume_is_read_only_below_its_submounts(vm_env):
    volume = vm_env.base / "ro-volume"
    (volume / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmrun-test", str(volume / "sub")], check=True)
    try:
        start_attacker_pod(vm_env)
        bundle = in_pod(vm_env.bundle("reader", ["sleep", "600"]), "container", mounts=[
            {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "ro"]}])
        assert vm_env.vmrun("create", "--bundle", str(bundle), "reader", detached=True).returncode == 0
        # As guest root, straight on the share: the guest's own mount flags are no barrier.
        tried = attack(vm_env, f"""
            for m in {GUEST_SHARE}/reader/mounts/*; do
                echo top > "$m/top" && echo wrote top
                [ -d "$m/sub" ] && echo below > "$m/sub/written" && echo wrote below
            done
            true""")
        assert "wrote" not in tried, tried
        assert not (volume / "top").exists()
        assert not (volume / "sub" / "written").exists()
        for container in ("reader", "pod"):
            assert vm_env.vmrun("delete", "--force", container).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(volume / "sub")], check=False)


def test_a_rootfs_that_is_the_hosts_root_is_refused(vm_env):
    bundle = vm_env.bundle("host-root", ["true"])
    os.rename(bundle / "rootfs", bundle / "busybox-rootfs")
    os.symlink("/", bundle / "rootfs")
    result = vm_env.vmrun("run", "--bundle", str(bundle), "host-root")
    assert result.returncode != 0
    assert b"host's root directory" in result.stderr, result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
