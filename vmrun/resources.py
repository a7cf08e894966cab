"""linux.resources, checked as runc reads them (Go's JSON into typed fields): a value of
the wrong type is refused in one line naming it, before anything is made; and sizes on
the command line as runc takes them (`--memory 512m`)."""

from __future__ import annotations

import re

from vmrun.errors import BundleError

_INTEGERS = {
    "memory": ("limit", "reservation", "swap", "kernel", "kernelTCP", "swappiness"),
    "cpu": ("shares", "quota", "period", "realtimeRuntime", "realtimePeriod", "burst", "idle"),
    "pids": ("limit",),
    "blockIO": ("weight", "leafWeight"),
}
_STRINGS = {"cpu": ("cpus", "mems")}
_BOOLEANS = {"memory": ("disableOOMKiller", "useHierarchy", "checkBeforeUpdate")}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resources(resources: object, where: str = "linux.resources") -> None:
    """A BundleError naming the first field of the wrong type."""
    if resources is None:
        return
    if not isinstance(resources, dict):
        raise BundleError(f"{where} must be an object")
    for section, keys in {**_INTEGERS, **_STRINGS, **_BOOLEANS}.items():
        part = resources.get(section)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise BundleError(f"{where}.{section} must be an object")
        for key in _INTEGERS.get(section, ()):
            if part.get(key) is not None and not _is_int(part[key]):
                raise BundleError(f"{where}.{section}.{key} must be an integer, not {part[key]!r}")
        for key in _STRINGS.get(section, ()):
            if part.get(key) is not None and not isinstance(part[key], str):
                raise BundleError(f"{where}.{section}.{key} must be a string, not {part[key]!r}")
        for key in _BOOLEANS.get(section, ()):
            if part.get(key) is not None and not isinstance(part[key], bool):
                raise BundleError(f"{where}.{section}.{key} must be true or false, not {part[key]!r}")


_SIZE = re.compile(r"^(-?\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes, from a number with an optional unit (k, m, g, t, p; binary, as runc's
    RAMInBytes): `512m`, `1g`, `1048576`, `-1` (no limit)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"invalid size {text!r}: a number of bytes, or with a unit (512m, 1g)")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value < -1 or (value < 0 and unit):
        raise ValueError(f"invalid size {text!r}")
    return int(value)
