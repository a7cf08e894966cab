"""Modules gRPC and protobuf import but a synchronous gRPC user never touches, imported
only when something first uses them (the guest's agent and the host's sandbox daemon).

`grpc` imports `grpc.aio` and its Cython core imports `asyncio` as they load, though
neither touches them until an asyncio server or channel is made; protobuf's descriptor
pool imports its pure-Python message implementation (and with it text_format and more)
even when the C one (upb) does the work. In the guest, under TCG, those imports are half
a second of every cold boot, before the agent can answer; in the daemon (whose QMP client
needs asyncio anyway) the rest is 1.7 MiB of every pod's host memory. A deferred module
stands in `sys.modules` and imports the real one at its first attribute lookup, so
whatever does use it (pyroute2 uses asyncio) still gets it, only later.

A package can also be entered without its `__init__`: pyroute2's imports every family it
speaks (nftables, wireless, ipvs, its NDB database on sqlite, ...) where the agent needs
IPRoute alone; 5 MiB of heap in every clone of a template that loaded it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

# gRPC's asyncio API and protobuf's pure-Python messages: `defer_unused_grpc_modules()`.
UNUSED_GRPC_MODULES = ("grpc.aio", "google.protobuf.internal.python_message")


class DeferredModule(types.ModuleType):
    """A stand-in for a module not imported yet; its first attribute lookup imports it.

    Whoever imported the stand-in keeps it (cygrpc holds its `asyncio`): every lookup
    on it is then passed to the real module."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # The import system reads __spec__ of what it finds in sys.modules: a plain spec
        # says "loaded", so `import asyncio` binds the stand-in without loading anything.
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self._vmrun_lock = threading.Lock()
        self._vmrun_real: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> object:
        # Only called for what the stand-in itself lacks.
        if attr.startswith("_vmrun_"):
            raise AttributeError(attr)
        return getattr(self._vmrun_load(), attr)

    def _vmrun_load(self) -> types.ModuleType:
        with self._vmrun_lock:
            if self._vmrun_real is None:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                self._vmrun_real = importlib.import_module(self.__name__)
            return self._vmrun_real


def is_loaded(module: types.ModuleType) -> bool:
    """Whether `module` is imported for real: a module, or a stand-in that has imported
    its own. (A function, not an attribute: the stand-in's attributes are the module's.)"""
    return not isinstance(module, DeferredModule) or module._vmrun_real is not None


def bare_package(name: str) -> types.ModuleType:
    """Put package `name` in sys.modules without running its `__init__`, so that its
    submodules load alone; the package itself if it is imported already."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"no package named {name!r}", name=name)
    package = importlib.util.module_from_spec(spec)  # made, not executed
    sys.modules[name] = package
    return package


def defer(name: str) -> DeferredModule | None:
    """Put a stand-in for `name` in sys.modules; None if it is imported already."""
    if name in sys.modules:
        return None
    stand_in = DeferredModule(name)
    sys.modules[name] = stand_in
    return stand_in


def load(name: str) -> types.ModuleType:
    """Module `name`, imported for real now if a stand-in held its place."""
    module = importlib.import_module(name)
    if isinstance(module, DeferredModule):
        return module._vmrun_load()
    return module


def defer_unused_grpc_modules(also: tuple[str, ...] = ()) -> None:
    """Call before the first `import grpc`; `also` names more modules to defer."""
    for name in (*also, *UNUSED_GRPC_MODULES):
        defer(name)
