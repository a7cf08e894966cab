"""Nothing the guest writes on the share gains privilege on the host: no setuid/setgid
file, no device node, and a rewritten setuid file loses its bit; while ordinary work
(chown, chmod, cp -a, tar -xp, dpkg unpacking setuid files) still succeeds."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from attacker import attacker_bundle
from debian_tools import add_dpkg, build_setid_package


def privileged_files(rootfs: Path) -> list[str]:
    """Files that would give a host user privilege: set-id non-directories, device nodes."""
    found = []
    for directory, dirs, files in os.walk(rootfs):
        for name in files + dirs:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                found.append(f"{name}: device {os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")
            elif not stat.S_ISDIR(info.st_mode) and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{name}: mode {stat.S_IMODE(info.st_mode):o}")
    return found


def run_as_attacker(vm_env, name: str, script: str, prepare=None) -> str:
    bundle = attacker_bundle(vm_env.base / "bundles" / name, script)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["env"] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    (bundle / "config.json").write_text(json.dumps(spec))
    if prepare:
        prepare(bundle / "rootfs")
    result = vm_env.vmrun("run", "--bundle", str(bundle), name)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_root_in_the_guest_plants_no_setid_file_nor_device_node(vm_env):
    def image_with_setid_files(rootfs: Path) -> None:
        for name, mode in (("existing-suid", 0o4755), ("existing-sgid", 0o2755)):
            shutil.copy("/bin/busybox", rootfs / "bin" / name)
            os.chmod(rootfs / "bin" / name, mode)

    out = run_as_attacker(vm_env, "planter", """
        cp /bin/busybox /planted && chmod 4755 /planted; echo "chmod 4755 $?"
        cp /bin/busybox /planted-g && chmod 2755 /planted-g; echo "chmod 2755 $?"
        cp /bin/busybox /disk && chown 0:6 /disk && chmod 2755 /disk; echo "group disk $?"
        cp -a /bin/existing-suid /copied-suid; echo "cp -a setuid $?"
        mknod /kvm c 10 232; echo "mknod c $?"
        mknod /loop b 7 0; echo "mknod b $?"
        cat /bin/busybox > /bin/existing-suid; echo "rewrite $?"
        echo >> /bin/existing-sgid; echo "append $?"
        ls -l /planted /bin/existing-suid""", prepare=image_with_setid_files)
    rootfs = vm_env.base / "bundles" / "planter" / "rootfs"
    assert privileged_files(rootfs) == [], out
    # Kept working, without the bits; device nodes refused.
    assert "chmod 4755 0" in out and "rewrite 0" in out and "append 0" in out, out
    assert "mknod c 1" in out and "mknod b 1" in out, out
    assert stat.S_IMODE((rootfs / "planted").stat().st_mode) == 0o755
    assert not (rootfs / "kvm").exists() and not (rootfs / "loop").exists()


def test_ordinary_work_on_the_share_still_succeeds(vm_env):
    def image_with_dpkg(rootfs: Path) -> None:
        add_dpkg(rootfs)
        build_setid_package(vm_env.base, rootfs / "tmp" / "setid.deb")

    out = run_as_attacker(vm_env, "worker", """
        set -e
        mkdir -p /work/d/e && echo hi > /work/d/e/f && ln -s f /work/d/e/link && mkfifo /work/d/fifo
        chown 1000:1000 /work/d/e/f && chmod 640 /work/d/e/f && chmod u+x,g+w /work/d/e
        cp -a /work/d /work/copy
        busybox tar -cpf /work/bb.tar -C /work d && mkdir /work/bb && busybox tar -xpf /work/bb.tar -C /work/bb
        /usr/bin/tar -cpf /work/gnu.tar -C /work d && mkdir /work/gnu && /usr/bin/tar -xpf /work/gnu.tar -C /work/gnu
        mkdir -m 2775 /work/group-dir
        /usr/bin/dpkg --unpack /tmp/setid.deb  # not busybox's applet, which the shell prefers
        ls -l /usr/bin/su-like /usr/bin/chage-like
        echo ALL DONE""", prepare=image_with_dpkg)
    assert "ALL DONE" in out, out
    rootfs = vm_env.base / "bundles" / "worker" / "rootfs"
    for tree in ("d", "copy", "bb/d", "gnu/d"):
        info = (rootfs / "work" / tree / "e" / "f").stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1000, 1000, 0o640), tree
        assert (rootfs / "work" / tree / "e" / "link").is_symlink(), tree
    assert stat.S_IMODE((rootfs / "work/group-dir").stat().st_mode) == 0o2775
    su, chage = (rootfs / "usr/bin/su-like").stat(), (rootfs / "usr/bin/chage-like").stat()
    assert (su.st_uid, stat.S_IMODE(su.st_mode)) == (0, 0o755)
    assert (chage.st_gid, stat.S_IMODE(chage.st_mode)) == (42, 0o755)
    assert privileged_files(rootfs) == []
