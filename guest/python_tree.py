"""Python in the guest: Debian's python3.11 with a trimmed stdlib, the wheels, the agent, .pyc.

The stdlib loses what a headless agent never imports (tests, IDLE, Tk, docs, build
configuration) and extension modules whose libraries the image does not carry (OpenSSL,
SQLite, ncurses, readline, Berkeley DB, mpdecimal). Everything is precompiled with the
guest's own interpreter (chroot) into unchecked-hash .pyc: under TCG compiling at import
time costs ~5x the load. The stdlib and the wheels are shipped sourceless (legacy .pyc next
to where the .py was); the vmrun agent keeps its sources for readable tracebacks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from vmrun.errors import ImageError
from vmrun.proc import run

PY = "python3.11"
STDLIB = f"usr/lib/{PY}"
DIST_PACKAGES = "usr/lib/python3/dist-packages"

# Top-level stdlib entries (files or packages, relative to /usr/lib/python3.11) to drop.
STDLIB_DROP_TOP = frozenset(
    {
        "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
        "distutils", "venv", "curses", "__phello__", "turtle.py", "__hello__.py",
        "antigravity.py", "this.py", "_distutils_system_mod.py", "sitecustomize.py",
        "EXTERNALLY-MANAGED", "LICENSE.txt", "idle.py",
    }
)  # fmt: skip
STDLIB_DROP_TOP_PATTERNS = (re.compile(r"config-3\.11.*"), re.compile(r"site-packages|dist-packages"))

# Extension modules (lib-dynload) to drop: missing libraries, tests, audio, terminal UI, and
# what nobody in the guest uses but imports if it is there: bz2 and lzma (shutil: 30 ms of
# each cold boot under TCG), ssl (asyncio, for pyroute2: OpenSSL's set-up is 1-2 MiB of
# heap in every clone; gRPC carries its own TLS, and the guest speaks none), sqlite3
# (pyroute2's NDB, which the agent does not load: agent/network.py).
DYNLOAD_DROP = frozenset(
    {
        "_hashlib", "_curses", "_curses_panel", "_dbm", "_gdbm", "_bz2", "_lzma", "_ssl", "_sqlite3",
        "_decimal", "nis", "readline", "_tkinter", "_ctypes_test", "_testbuffer", "_testcapi",
        "_testclinic", "_testimportmultiple", "_testinternalcapi", "_testmultiphase",
        "_xxtestfuzz", "xxlimited", "xxlimited_35", "ossaudiodev", "audioop", "xxsubtype",
    }
)  # fmt: skip

# Anywhere in the Python trees: files nobody imports at run time.
DROP_SUFFIXES = (".pyi", ".pxd", ".pxi", ".pyx", ".c", ".h", ".cpp", ".exe", ".whl")


def keep_stdlib_path(rel: str) -> bool:
    """Pruning rule for a path relative to /usr/lib/python3.11 (posix separators)."""
    parts = PurePosixPath(rel).parts
    if not parts:
        return True
    top = parts[0]
    if top in STDLIB_DROP_TOP or any(p.fullmatch(top) for p in STDLIB_DROP_TOP_PATTERNS):
        return False
    if "__pycache__" in parts or "tests" in parts[:-1] or "idle_test" in parts:
        return False
    if top == "lib-dynload" and len(parts) == 2:
        if parts[1].split(".", 1)[0] in DYNLOAD_DROP:
            return False
    return not rel.endswith(DROP_SUFFIXES)


def keep_site_path(rel: str) -> bool:
    """Pruning rule for a path relative to dist-packages."""
    parts = PurePosixPath(rel).parts
    if "__pycache__" in parts:
        return False
    return not rel.endswith(DROP_SUFFIXES)


def _copy_filtered(src: Path, dest: Path, keep: Callable[[str], bool]) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        rel_dir = here.relative_to(src).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if keep(rel_dir + d))
        (dest / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            rel = rel_dir + name
            if not keep(rel):
                continue
            source = here / name
            target = dest / rel
            if source.is_symlink():
                link = os.readlink(source)
                if os.path.isabs(link) or not (here / link).exists():
                    continue  # e.g. sitecustomize.py -> /etc/python3.11/...: drop
                os.symlink(link, target)
            else:
                shutil.copy2(source, target)


def install_python(staging: Path, root: Path) -> None:
    """Interpreter and trimmed stdlib from the extracted Debian packages."""
    binary = staging / "usr/bin" / PY
    if not binary.exists():
        raise ImageError(f"python3.11-minimal did not provide /usr/bin/{PY}")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, root / "usr/bin" / PY)
    for alias in ("python3", "python"):
        os.symlink(PY, root / "usr/bin" / alias)
    _copy_filtered(staging / STDLIB, root / STDLIB, keep_stdlib_path)
    (root / DIST_PACKAGES).mkdir(parents=True, exist_ok=True)


# -- wheels -------------------------------------------------------------------------------------

WHEEL_DISTRIBUTIONS = ("grpcio", "protobuf", "typing_extensions", "pyroute2")
WHEEL_PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
)


def host_versions(names: Iterable[str] = WHEEL_DISTRIBUTIONS) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ImageError(
                f"cannot download Python wheel {name}: it is not installed on the host"
                " (the guest carries the host's version)"
            ) from None
    return versions


def _wheel_prefix(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def cached_wheel(name: str, version: str, wheels_dir: Path) -> Path | None:
    prefix = _wheel_prefix(name, version)
    for whl in sorted(wheels_dir.glob("*.whl")):
        if whl.name.lower().startswith(prefix):
            return whl
    return None


def _pip() -> list[str]:
    """How to run pip: this interpreter's, else a pip on PATH (tags are given explicitly)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise ImageError("cannot download Python wheels: pip is not installed")


def download_wheels(
    versions: dict[str, str], wheels_dir: Path, log: Callable[[str], None]
) -> dict[str, Path]:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, version in versions.items():
        existing = cached_wheel(name, version, wheels_dir)
        if existing is not None:
            paths[name] = existing
            continue
        log(f"downloading wheel {name}=={version}")
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=wheels_dir))
        try:
            argv = [
                *_pip(), "download", "--quiet", "--no-deps",
                "--disable-pip-version-check", "--only-binary=:all:", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
                *(arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)),
                "--dest", str(tmp), f"{name}=={version}",
            ]  # fmt: skip
            result = run(argv, check=False, timeout=600)
            got = cached_wheel(name, version, tmp)
            if result.returncode != 0 or got is None:
                text = result.stderr.decode(errors="replace") or result.stdout.decode()
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                errs = [ln for ln in lines if ln.startswith("ERROR")]
                reason = (errs or lines or ["pip produced no wheel"])[0]
                reason = re.sub(r"\s*\(from versions:.*?\)", "", reason)[:300]
                raise ImageError(f"cannot download Python wheel {name}=={version}: {reason}")
            dest = wheels_dir / got.name
            got.rename(dest)
            paths[name] = dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def install_wheel(wheel: Path, root: Path) -> None:
    """Unpack a wheel into dist-packages (purelib/platlib of .data included)."""
    site = root / DIST_PACKAGES
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            name = member.filename
            if member.is_dir():
                continue
            parts = PurePosixPath(name).parts
            if ".." in parts or name.startswith("/"):
                raise ImageError(f"wheel {wheel.name} has an unsafe path {name}")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    name = "/".join(parts[2:])
                else:
                    continue  # scripts, headers, data: not needed in the guest
            if not keep_site_path(name):
                continue
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (member.external_attr >> 16) & 0o777
            os.chmod(target, mode if mode & 0o400 else 0o644)


# -- the agent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSources:
    package_dir: Path  # the vmrun package directory on the host
    files: tuple[str, ...]  # relative to package_dir

    def digest(self) -> str:
        h = hashlib.sha256()
        for rel in self.files:
            h.update(rel.encode() + b"\0")
            h.update((self.package_dir / rel).read_bytes())
            h.update(b"\0")
        return h.hexdigest()


def agent_sources(package_dir: Path | None = None) -> AgentSources:
    """vmrun/__init__.py, vmrun/agent/*.py and vmrun/common/*.py (what the agent shares
    with the host) of the vmrun package next to this builder."""
    if package_dir is None:
        import vmrun

        package_dir = Path(vmrun.__file__).resolve().parent
    files = ["__init__.py"] if (package_dir / "__init__.py").exists() else []
    for subpackage in ("agent", "common"):
        if (package_dir / subpackage).is_dir():
            files += sorted(f"{subpackage}/{p.name}" for p in (package_dir / subpackage).glob("*.py") if p.is_file())
    if not files:
        raise ImageError(f"no vmrun package sources found in {package_dir}")
    return AgentSources(package_dir, tuple(files))


def install_agent(sources: AgentSources, root: Path) -> None:
    dest = root / DIST_PACKAGES / "vmrun"
    for rel in sources.files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources.package_dir / rel, target)


# -- bytecode ----------------------------------------------------------------------------------


def compile_tree(root: Path, sourceless: list[str], with_sources: list[str]) -> None:
    """Precompile with the guest's interpreter inside a chroot of the guest tree.

    `sourceless` directories get legacy .pyc next to each .py, and the .py are removed;
    `with_sources` directories (which may lie inside a sourceless one) keep the .py and get
    __pycache__/*.cpython-311.pyc.
    """
    # -B: the interpreter running compileall must not leave its own __pycache__ behind.
    base = ["chroot", str(root), f"/usr/bin/{PY}", "-I", "-B", "-m", "compileall", "-q"]
    mode = ["--invalidation-mode", "unchecked-hash"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "PYTHONHASHSEED": "0"}
    keep = ["/" + d.strip("/") + "/" for d in with_sources]
    exclude = ["-x", "|".join(re.escape(k) for k in keep)] if keep else []
    for dirs, extra in ((sourceless, ["-b", *exclude]), (with_sources, [])):
        existing = ["/" + d.strip("/") for d in dirs if (root / d.strip("/")).is_dir()]
        if not existing:
            continue
        result = run([*base, *extra, *mode, *existing], check=False, env=env, timeout=900)
        if result.returncode != 0:
            text = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise ImageError(
                "cannot precompile the guest's Python code: "
                + (text.splitlines()[-1] if text else f"exit status {result.returncode}")
            )
    for d in sourceless:
        top = root / d.strip("/")
        for py in top.rglob("*.py"):
            guest_path = "/" + py.relative_to(root).as_posix()
            if any(guest_path.startswith(k) for k in keep):
                continue
            if py.with_suffix(".pyc").exists():
                py.unlink()
        for cache in [p for p in top.rglob("__pycache__") if p.is_dir()]:
            guest_path = "/" + cache.relative_to(root).as_posix() + "/"
            if not any(guest_path.startswith(k) for k in keep):
                shutil.rmtree(cache)
