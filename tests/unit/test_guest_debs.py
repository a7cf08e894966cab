import subprocess

import pytest

from guest import debs
from guest.debs import Package
from vmrun.errors import ImageError

POLICY = """\
linux-image-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-3
  Version table:
     6.1.192-3 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        100 /var/lib/dpkg/status
ghost:
  Installed: (none)
  Candidate: (none)
  Version table:
"""

SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.

Package: crun
Version: 1.8.1-1+deb12u1
Depends: libc6 (>= 2.34), libcap2 (>= 1:2.10), libseccomp2 (>= 2.5.0),
 libsystemd0 | libelogind0, libyajl2 (>= 2.0.4)
Pre-Depends: dpkg (>= 1.17)

"""


def test_parse_policy():
    versions = debs.parse_policy(POLICY)
    assert versions == {
        "linux-image-cloud-amd64": "6.1.192-3",
        "busybox-static": "1:1.35.0-4+deb12u1+b1",
        "ghost": None,
    }


def test_parse_show_depends_first_alternative_and_continuations():
    pkgs = debs.parse_show(SHOW)
    assert pkgs["linux-image-cloud-amd64"].depends == ("linux-image-6.1.0-57-cloud-amd64",)
    assert pkgs["crun"].version == "1.8.1-1+deb12u1"
    assert pkgs["crun"].depends == ("dpkg", "libc6", "libcap2", "libseccomp2", "libsystemd0", "libyajl2")


def test_deb_filename_quotes_epoch():
    assert debs.deb_filename_glob(Package("busybox-static", "1:1.35.0-4")) == "busybox-static_1%3a1.35.0-4_*.deb"


class FakeRun:
    """Stands in for vmrun.proc.run: records argv, 'downloads' by writing files."""

    def __init__(self, fail=(), policy=""):
        self.calls = []
        self.fail = set(fail)
        self.policy = policy

    def __call__(self, argv, *, check=True, cwd=None, **kw):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        if argv[:2] == ["apt-get", "download"]:
            specs = [a for a in argv[2:] if not a.startswith("-")]
            bad = [s for s in specs if s.split("=")[0] in self.fail]
            if bad:  # like apt-get: an unknown version fails the whole call up front
                name, version = bad[0].split("=")
                err = f"W: x\nE: Version '{version}' for '{name}' was not found\n"
                return subprocess.CompletedProcess(argv, 100, b"", err.encode())
            for spec in specs:
                name, version = spec.split("=")
                (cwd / f"{name}_{version.replace(':', '%3a')}_amd64.deb").write_bytes(b"deb")
            return subprocess.CompletedProcess(argv, 0, b"", b"W: unsandboxed\n")
        if argv[0] == "apt-cache":
            return subprocess.CompletedProcess(argv, 0, self.policy.encode(), b"")
        raise AssertionError(argv)


def test_download_reuses_cached_debs(tmp_path, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(debs, "run", fake)
    pkgs = [Package("crun", "1.8.1-1"), Package("busybox-static", "1:1.35.0-4")]
    first = debs.download(pkgs, tmp_path, lambda m: None)
    assert sorted(p.name for p in first.values()) == ["busybox-static_1%3a1.35.0-4_amd64.deb", "crun_1.8.1-1_amd64.deb"]
    assert len(fake.calls) == 1
    second = debs.download(pkgs, tmp_path, lambda m: None)
    assert second == first
    assert len(fake.calls) == 1  # nothing downloaded again
    # A new version is downloaded; the old one is pruned afterwards.
    third = debs.download([Package("crun", "1.9-1")], tmp_path, lambda m: None)
    debs.prune_debs(tmp_path, third.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crun_1.9-1_amd64.deb"]


def test_download_failure_names_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    fake = FakeRun(fail={"libbroken1"})
    monkeypatch.setattr(debs, "run", fake)
    pkgs = [Package("crun", "1.8.1-1"), Package("libbroken1", "2.0-1")]
    with pytest.raises(ImageError) as info:
        debs.download(pkgs, tmp_path, lambda m: None)
    message = str(info.value)
    assert message.startswith("cannot download Debian package libbroken1: ")
    assert "\n" not in message and "2.0-1" in message
    assert list(tmp_path.iterdir()) == []  # no temporary directory, no partial files


def test_policy_versions_unknown_package(monkeypatch):
    monkeypatch.setattr(debs, "run", FakeRun(policy=POLICY))
    assert debs.policy_versions(["busybox-static"]) == {"busybox-static": "1:1.35.0-4+deb12u1+b1"}
    for name in ("ghost", "not-in-output"):
        with pytest.raises(ImageError, match=f"cannot download Debian package {name}: "):
            debs.policy_versions(["busybox-static", name])


def test_ensure_lists_runs_update_only_without_lists(tmp_path, monkeypatch):
    calls = []

    def run(argv, **kw):
        calls.append([str(a) for a in argv])
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(debs, "run", run)
    debs.ensure_lists(lambda m: None, lists_dir=tmp_path)
    assert calls == [["apt-get", "update", "-q"]]
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").write_bytes(b"")
    debs.ensure_lists(lambda m: None, lists_dir=tmp_path)
    assert len(calls) == 1
