"""Debian's dpkg and GNU tar in a busybox rootfs (copied from the host with their
libraries), and a package that ships setuid and setgid files: what a container's package
install does to the share, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_PROGRAMS = ("/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-split", "/usr/bin/tar")


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [word for line in out.splitlines() for word in line.split() if word.startswith("/")]


def add_dpkg(rootfs: Path) -> None:
    """dpkg, its helpers and GNU tar (dpkg-deb runs it) in `rootfs`, which has busybox."""
    for path in {p for program in _PROGRAMS for p in (program, *_libraries(program))}:
        (rootfs / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, rootfs / path.lstrip("/"))
    (rootfs / "bin" / "tar").unlink(missing_ok=True)
    os.symlink("/usr/bin/tar", rootfs / "bin" / "tar")
    # dpkg insists on finding these; the package below needs neither.
    for name in ("ldconfig", "start-stop-daemon"):
        (rootfs / "bin" / name).unlink(missing_ok=True)
        (rootfs / "bin" / name).write_text("#!/bin/sh\nexit 0\n")
        (rootfs / "bin" / name).chmod(0o755)
    for directory in ("info", "updates", "triggers"):
        (rootfs / "var/lib/dpkg" / directory).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (rootfs / "var/lib/dpkg" / name).touch()


def build_setid_package(work: Path, output: Path) -> None:
    """A .deb shipping usr/bin/su-like (root, 4755) and usr/bin/chage-like (root:shadow,
    2755), as Debian's passwd does."""
    tree = work / "setid-package"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text("Package: setid-example\nVersion: 1.0\nArchitecture: all\n"
                                         "Maintainer: vmrun tests <tests@vmrun.invalid>\n"
                                         "Description: ships setuid and setgid files\n")
    for name, group, mode in (("su-like", 0, 0o4755), ("chage-like", 42, 0o2755)):
        shutil.copy("/bin/busybox", tree / "usr/bin" / name)
        os.chown(tree / "usr/bin" / name, 0, group)
        os.chmod(tree / "usr/bin" / name, mode)
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(tree), str(output)], check=True, capture_output=True)
