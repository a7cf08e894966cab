"""Deferred imports (the agent's and the sandbox daemon's): a stand-in is bound by
`import`, and the real module is imported at the first attribute lookup, whichever way
it is reached."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from vmrun.common.deferred_imports import DeferredModule, bare_package, defer, is_loaded, load

PACKAGE = "vmrun_deferred_probe"


@pytest.fixture
def probe_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package whose import is visible: it counts its loads in a file."""
    package = tmp_path / PACKAGE
    package.mkdir()
    counter = tmp_path / "loads"
    (package / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        _counter = Path({str(counter)!r})
        _counter.write_text(str(int(_counter.read_text() or 0) + 1) if _counter.exists() else "1")
        VALUE = 42
        from . import part
    """))
    (package / "part.py").write_text("WORD = 'part'\n")
    (package / "extra.py").write_text("WORD = 'extra'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield counter
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def loads(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


def test_import_binds_the_stand_in_without_loading(probe_package: Path) -> None:
    stand_in = defer(PACKAGE)
    assert isinstance(stand_in, DeferredModule)
    module = importlib.import_module(PACKAGE)
    assert module is stand_in and not is_loaded(stand_in)
    assert loads(probe_package) == 0


def test_first_attribute_loads_the_real_module_once(probe_package: Path) -> None:
    stand_in = defer(PACKAGE)
    assert stand_in is not None
    assert stand_in.VALUE == 42
    assert stand_in.part.WORD == "part"
    assert is_loaded(stand_in) and loads(probe_package) == 1
    real = sys.modules[PACKAGE]
    assert real is not stand_in and real.VALUE == 42
    importlib.import_module(PACKAGE)
    assert loads(probe_package) == 1


def test_from_import_and_submodule_import_go_through(probe_package: Path) -> None:
    defer(PACKAGE)
    namespace: dict = {}
    exec(f"from {PACKAGE} import part", namespace)
    assert namespace["part"].WORD == "part"
    assert loads(probe_package) == 1

    for name in [n for n in sys.modules if n.startswith(PACKAGE)]:
        del sys.modules[name]
    defer(PACKAGE)
    extra = importlib.import_module(f"{PACKAGE}.extra")
    assert extra.WORD == "extra" and loads(probe_package) == 2


def test_load_imports_what_a_stand_in_held(probe_package: Path) -> None:
    stand_in = defer(PACKAGE)
    real = load(PACKAGE)
    assert real is not stand_in and real.VALUE == 42 and is_loaded(stand_in)
    assert load(PACKAGE) is real and loads(probe_package) == 1


def test_a_bare_package_gives_its_submodules_without_its_init(probe_package: Path) -> None:
    package = bare_package(PACKAGE)
    extra = importlib.import_module(f"{PACKAGE}.extra")
    assert extra.WORD == "extra"
    assert loads(probe_package) == 0 and not hasattr(package, "VALUE")
    assert bare_package(PACKAGE) is package
    with pytest.raises(ImportError):
        bare_package(f"{PACKAGE}.part")  # a module, not a package


def test_a_module_already_imported_is_left_alone() -> None:
    assert defer("json") is None
    assert not isinstance(sys.modules["json"], DeferredModule)


def test_a_missing_attribute_is_still_an_attribute_error(probe_package: Path) -> None:
    stand_in = defer(PACKAGE)
    with pytest.raises(AttributeError):
        stand_in.no_such_thing
    assert not hasattr(stand_in, "no_such_thing")


GRPC_PROBE = """
import sys
from vmrun.common.deferred_imports import DeferredModule, defer_unused_grpc_modules, is_loaded
defer_unused_grpc_modules(also=("asyncio",))
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    call = channel.unary_unary("/no.Such/Method")
    try:
        call(b"", timeout=10)
    except grpc.RpcError as exc:
        print("code", exc.code().name)
server.stop(None)
from google.protobuf import struct_pb2
message = struct_pb2.Struct(fields={"a": struct_pb2.Value(number_value=1.0)})
assert struct_pb2.Struct.FromString(message.SerializeToString()) == message
from google.protobuf.internal import api_implementation
# Only the pure-Python implementation needs it.
print("python_message used", is_loaded(sys.modules["google.protobuf.internal.python_message"])
      == (api_implementation.Type() == "python"))
print("asyncio loaded", is_loaded(sys.modules["asyncio"]))
print("aio server", callable(grpc.aio.server))
print("asyncio loaded", is_loaded(sys.modules["asyncio"]) and not isinstance(sys.modules["asyncio"], DeferredModule))
"""


def test_grpc_serves_without_the_deferred_modules_and_still_finds_them() -> None:
    import subprocess

    result = subprocess.run([sys.executable, "-c", GRPC_PROBE], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ["code UNIMPLEMENTED", "python_message used True", "asyncio loaded False",
                                         "aio server True", "asyncio loaded True", ""]
