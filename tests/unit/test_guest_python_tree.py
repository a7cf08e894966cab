import zipfile

import pytest

from guest import python_tree
from guest.python_tree import keep_site_path, keep_stdlib_path
from vmrun.errors import ImageError


@pytest.mark.parametrize(
    "path",
    [
        "json/__init__.py",
        "asyncio/base_events.py",
        "encodings/utf_8.py",
        "lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_uuid.cpython-311-x86_64-linux-gnu.so",
        "unittest/mock.py",
        "os.py",
        "_sysconfigdata__x86_64-linux-gnu.py",
        "dbm/dumb.py",
        "multiprocessing/pool.py",
    ],
)
def test_stdlib_keeps(path):
    assert keep_stdlib_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "test",
        "test/support/__init__.py",
        "idlelib/idle.py",
        "tkinter/__init__.py",
        "turtledemo",
        "ensurepip/__init__.py",
        "lib2to3/pytree.py",
        "pydoc_data/topics.py",
        "config-3.11-x86_64-linux-gnu/Makefile",
        "distutils/core.py",
        "sitecustomize.py",
        "json/__pycache__/decoder.cpython-311.pyc",
        "unittest/tests/test_case.py",
        "lib-dynload/_hashlib.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_decimal.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/readline.cpython-311-x86_64-linux-gnu.so",
    ],
)
def test_stdlib_drops(path):
    assert not keep_stdlib_path(path)


def test_site_rules():
    assert keep_site_path("grpc/_cython/_credentials/roots.pem")
    assert keep_site_path("grpc/__init__.py")
    assert not keep_site_path("grpc/_cython/cygrpc.pxd")
    assert not keep_site_path("google/protobuf/message.pyi")
    assert not keep_site_path("grpc/__pycache__/x.cpython-311.pyc")


def test_install_python_copies_filtered_stdlib(tmp_path):
    staging, root = tmp_path / "staging", tmp_path / "root"
    lib = staging / "usr/lib/python3.11"
    for rel in ("os.py", "json/__init__.py", "test/regrtest.py", "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so"):
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text("x")
    (lib / "sitecustomize.py").symlink_to("/etc/python3.11/sitecustomize.py")
    (lib / "_sysconfigdata__linux.py").symlink_to("os.py")
    (staging / "usr/bin").mkdir(parents=True)
    (staging / "usr/bin/python3.11").write_text("elf")
    python_tree.install_python(staging, root)
    out = root / "usr/lib/python3.11"
    assert (out / "os.py").exists() and (out / "json/__init__.py").exists()
    assert not (out / "test").exists()
    assert not (out / "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so").exists()
    assert not (out / "sitecustomize.py").is_symlink()  # absolute link into the host's /etc
    assert (out / "_sysconfigdata__linux.py").is_symlink()
    assert (root / "usr/bin/python3").resolve() == (root / "usr/bin/python3.11").resolve()
    assert (root / "usr/lib/python3/dist-packages").is_dir()


def test_install_wheel(tmp_path):
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("demo/__init__.py", "VERSION = 1\n")
        zf.writestr("demo/__init__.pyi", "VERSION: int\n")
        zf.writestr("demo/data.pem", "cert\n")
        zf.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
        zf.writestr("demo-1.0.data/purelib/demo_extra.py", "x = 1\n")
        zf.writestr("demo-1.0.data/scripts/demo", "#!/bin/sh\n")
    python_tree.install_wheel(whl, tmp_path / "root")
    site = tmp_path / "root/usr/lib/python3/dist-packages"
    assert (site / "demo/__init__.py").read_text() == "VERSION = 1\n"
    assert (site / "demo/data.pem").exists()
    assert (site / "demo_extra.py").exists()
    assert (site / "demo-1.0.dist-info/METADATA").exists()
    assert not (site / "demo/__init__.pyi").exists()
    assert not any(site.rglob("demo-1.0.data"))


def test_install_wheel_rejects_escaping_paths(tmp_path):
    whl = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("../../etc/passwd", "x")
    with pytest.raises(ImageError):
        python_tree.install_wheel(whl, tmp_path / "root")


def test_agent_sources_and_digest(tmp_path):
    pkg = tmp_path / "vmrun"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "cli.py").write_text("host only\n")
    only_init = python_tree.agent_sources(pkg)
    assert only_init.files == ("__init__.py",)
    (pkg / "agent").mkdir()
    (pkg / "agent/server.py").write_text("print('agent')\n")
    (pkg / "agent/agent.proto").write_text("syntax\n")
    (pkg / "common").mkdir()
    (pkg / "common/linux.py").write_text("print('shared')\n")
    sources = python_tree.agent_sources(pkg)
    assert sources.files == ("__init__.py", "agent/server.py", "common/linux.py")
    digest = sources.digest()
    assert digest == python_tree.agent_sources(pkg).digest()
    (pkg / "agent/server.py").write_text("print('agent v2')\n")
    assert python_tree.agent_sources(pkg).digest() != digest
    python_tree.install_agent(sources, tmp_path / "root")
    assert (tmp_path / "root/usr/lib/python3/dist-packages/vmrun/agent/server.py").exists()
    assert not (tmp_path / "root/usr/lib/python3/dist-packages/vmrun/cli.py").exists()


def test_cached_wheel_name_normalisation(tmp_path):
    (tmp_path / "typing_extensions-4.15.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "grpcio-1.85.3-cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"")
    assert python_tree.cached_wheel("typing-extensions", "4.15.0", tmp_path) is not None
    assert python_tree.cached_wheel("grpcio", "1.85.3", tmp_path) is not None
    assert python_tree.cached_wheel("grpcio", "1.85.30", tmp_path) is None
