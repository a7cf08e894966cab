"""Debian packages: candidate versions (cheap, for the cache key), download, extraction.

Versions come from one `apt-cache show --no-all-versions` call over all package names; APT
is pointed at a binary package cache inside the image cache directory so that repeated
calls take ~0.1 s instead of rebuilding APT's cache from the lists every time.
Downloads go to `debs_dir` and are reused as long as the candidate version does not change.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from vmrun.errors import ImageError
from vmrun.proc import run

APT_LISTS = Path("/var/lib/apt/lists")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    depends: tuple[str, ...] = ()  # first alternative of each Depends/Pre-Depends entry

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    chosen = (errors or lines or ["unknown error"])[-1]
    return re.sub(r"^E:\s*", "", chosen)


def lists_present(lists_dir: Path = APT_LISTS) -> bool:
    return any(lists_dir.glob("*_Packages*"))


def ensure_lists(log: Log, lists_dir: Path = APT_LISTS) -> None:
    """Run `apt-get update` once when APT has no package lists yet."""
    if lists_present(lists_dir):
        return
    log("apt has no package lists: running apt-get update")
    result = run(["apt-get", "update", "-q"], check=False, timeout=600)
    if result.returncode != 0:
        raise ImageError(
            "cannot update the Debian package lists: "
            + _one_line(result.stderr.decode(errors="replace") or result.stdout.decode())
        )


def apt_cache_options(cache_dir: Path | None) -> list[str]:
    if cache_dir is None:
        return []
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [
        "-o", f"Dir::Cache::pkgcache={cache_dir / 'pkgcache.bin'}",
        "-o", "Dir::Cache::srcpkgcache=",
    ]  # fmt: skip


def parse_show(text: str) -> dict[str, Package]:
    """Parse `apt-cache show` stanzas into {name: Package} (first stanza per name wins)."""
    packages: dict[str, Package] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current: str | None = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                if current is not None:
                    fields[current] += " " + line.strip()
                continue
            key, sep, value = line.partition(":")
            if not sep:
                continue
            current = key.strip()
            fields[current] = value.strip()
        name, version = fields.get("Package"), fields.get("Version")
        if not name or not version or name in packages:
            continue
        depends: list[str] = []
        for key in ("Pre-Depends", "Depends"):
            for entry in fields.get(key, "").split(","):
                first = entry.split("|")[0].strip()
                dep = re.split(r"[\s(:]", first, maxsplit=1)[0]
                if dep:
                    depends.append(dep)
        packages[name] = Package(name, version, tuple(depends))
    return packages


def parse_policy(text: str) -> dict[str, str | None]:
    """Parse `apt-cache policy NAME...`: {name: candidate version, or None for "(none)"}."""
    versions: dict[str, str | None] = {}
    current: str | None = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
            continue
        stripped = line.strip()
        if current is not None and stripped.startswith("Candidate:"):
            value = stripped.partition(":")[2].strip()
            versions.setdefault(current, None if value in ("", "(none)") else value)
            current = None
    return versions


def _no_candidate(name: str) -> ImageError:
    return ImageError(
        f"cannot download Debian package {name}: apt has no candidate version"
        " (wrong name, or the package lists are out of date: run apt-get update)"
    )


def policy_versions(names: Iterable[str], apt_cache_dir: Path | None = None) -> dict[str, str]:
    """Candidate version of every package (one cheap `apt-cache policy` call)."""
    wanted = list(dict.fromkeys(names))
    result = run(
        ["apt-cache", *apt_cache_options(apt_cache_dir), "policy", *wanted],
        check=False,
        timeout=120,
    )
    found = parse_policy(result.stdout.decode(errors="replace"))
    versions: dict[str, str] = {}
    for name in wanted:
        version = found.get(name)
        if not version:
            raise _no_candidate(name)
        versions[name] = version
    return versions


def candidates(names: Iterable[str], apt_cache_dir: Path | None = None) -> dict[str, Package]:
    """Candidate version and dependencies of every package (`apt-cache show`: ~0.2 s)."""
    wanted = list(dict.fromkeys(names))
    result = run(
        ["apt-cache", *apt_cache_options(apt_cache_dir), "show", "--no-all-versions", *wanted],
        check=False,
        timeout=120,
    )
    found = parse_show(result.stdout.decode(errors="replace"))
    for name in wanted:
        if name not in found:
            raise _no_candidate(name)
    return {name: found[name] for name in wanted}


def deb_filename_glob(pkg: Package) -> str:
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' (epoch) quoted as %3a.
    return f"{pkg.name}_{pkg.version.replace(':', '%3a')}_*.deb"


def cached_deb(pkg: Package, debs_dir: Path) -> Path | None:
    matches = sorted(debs_dir.glob(deb_filename_glob(pkg)))
    return matches[0] if matches else None


def download(packages: Iterable[Package], debs_dir: Path, log: Log) -> dict[str, Path]:
    """Make sure a .deb of each package (at its exact version) is in debs_dir; return paths.

    Downloads happen in a private temporary directory and only complete files are moved
    into debs_dir, so a failure leaves nothing half-downloaded behind.
    """
    debs_dir.mkdir(parents=True, exist_ok=True)
    pkgs = list(packages)
    paths: dict[str, Path] = {}
    missing: list[Package] = []
    for pkg in pkgs:
        existing = cached_deb(pkg, debs_dir)
        if existing is not None:
            paths[pkg.name] = existing
        else:
            missing.append(pkg)
    if not missing:
        return paths
    log(f"downloading {len(missing)} Debian package(s): {' '.join(p.name for p in missing)}")
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs_dir))
    try:
        tmp.chmod(0o755)
        result = run(
            ["apt-get", "download", "-q", *(p.spec for p in missing)], check=False, cwd=tmp
        )
        if result.returncode != 0:
            # Find the culprit: retry one by one, report the first that fails.
            for pkg in missing:
                if _glob_one(tmp, pkg) is not None:
                    continue
                one = run(["apt-get", "download", "-q", pkg.spec], check=False, cwd=tmp)
                if one.returncode != 0:
                    reason = _one_line(one.stderr.decode(errors="replace"))
                    raise ImageError(f"cannot download Debian package {pkg.name}: {reason}")
        for pkg in missing:
            got = _glob_one(tmp, pkg)
            if got is None:
                raise ImageError(
                    f"cannot download Debian package {pkg.name}: apt-get download"
                    f" produced no file for version {pkg.version}"
                )
            dest = debs_dir / got.name
            got.rename(dest)
            paths[pkg.name] = dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _glob_one(directory: Path, pkg: Package) -> Path | None:
    matches = sorted(directory.glob(deb_filename_glob(pkg)))
    return matches[0] if matches else None


def extract(debs: Mapping[str, Path], dest: Path) -> None:
    """Extract every .deb into dest (file contents only; no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, deb in debs.items():
        result = run(["dpkg-deb", "-x", deb, dest], check=False, timeout=300)
        if result.returncode != 0:
            raise ImageError(
                f"cannot extract Debian package {name} ({deb.name}): "
                + _one_line(result.stderr.decode(errors="replace"))
            )


def prune_debs(debs_dir: Path, keep: Iterable[Path]) -> None:
    """Remove .debs of versions no longer used."""
    keep_names = {p.name for p in keep}
    for deb in debs_dir.glob("*.deb"):
        if deb.name not in keep_names:
            deb.unlink(missing_ok=True)
