"""vmrun's configuration: /etc/vmrun/vmrun.toml, or the file VMRUN_CONFIG names.

Every key is optional; a missing file means the defaults. Unknown keys and wrong types are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmrun.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/vmrun/vmrun.toml")
ACCELERATIONS = ("auto", "kvm", "tcg")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETWORK_MODELS = ("tcfilter", "none")
GUEST_KERNELS = ("vmrun", "debian")


@dataclass(frozen=True)
class Config:
    # QEMU and its helpers; empty means "find it".
    qemu: str = "qemu-system-x86_64"
    virtiofsd: str = ""
    # Guest image: built by `vmrun image build` into image_dir, unless kernel and initrd
    # are given explicitly.
    image_dir: Path = Path("/var/lib/vmrun/image")
    # The kernel `vmrun image build` puts in the image: "vmrun" (built from Debian's
    # linux-source with guest/kernel-config/vmrun.config, drivers built in) or "debian"
    # (Debian's cloud kernel and its modules).
    guest_kernel: str = "vmrun"
    kernel: str = ""
    initrd: str = ""
    kernel_params: str = ""
    # Guest size.
    vcpus: int = 1
    memory_mib: int = 512
    # "auto" uses KVM where it really runs guests, else TCG.
    acceleration: str = "auto"
    # Where each sandbox keeps its sockets and logs (short: unix socket paths are limited).
    run_dir: Path = Path("/run/vmrun-sandboxes")
    # VM templating: the template new sandboxes restore from, built on first use ("" boots
    # every guest), and where templates are saved (definitions are vmtemplates/NAME.toml).
    template: str = "default"
    # How a pod's CNI interfaces reach the guest: "tcfilter" (a tap mirrored to each veth
    # with tc) or "none" (the tap only).
    network_model: str = "tcfilter"
    templates_dir: Path = Path("/var/lib/vmrun/templates")
    # A pool of ready guests (`vmrun pool serve`): create takes one from this socket when
    # it is set, and boots or clones when the pool is empty or gone.
    pool_socket: str = ""
    pool_size: int = 2
    # Seconds to wait for a cold-booted guest's agent to be ready.
    boot_timeout: float = 60.0
    log_level: str = "info"

    @property
    def vm_dir(self) -> Path:
        return self.run_dir / "vm"


_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A sandbox's sockets lie at run_dir/vm/<16 hex>/<name of up to 32 bytes>, and a unix
# socket path holds at most 107 bytes.
_RUN_DIR_MAX = 107 - len("/vm/") - 16 - 1 - 32
_SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class _Rule:
    """How one key is checked: its TOML type, then its range. `check` returns what is
    wrong with a value of the right type ("" when nothing is)."""

    kind: type
    check: Callable[[Any], str] = lambda value: ""


def _between(low: float, high: float) -> Callable[[Any], str]:
    def check(value: float) -> str:
        if value != value:  # NaN: neither below nor above anything, and no timeout at all
            return f"must be a number from {low:g} to {high:g} (got nan)"
        if value < low:
            return f"must be >= {low:g} (got {value!r})"
        if value > high:
            return f"must be <= {high:g} (got {value!r})"
        return ""
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    return lambda value: "" if value in choices else f"must be one of {', '.join(choices)} (got {value!r})"


def _absolute_path(max_len: int = 4095, empty_ok: bool = False) -> Callable[[Any], str]:
    def check(value: str) -> str:
        if not value and empty_ok:
            return ""
        if not value.startswith("/"):
            return f"must be an absolute path (got {value!r})"
        if "\0" in value or "\n" in value:
            return f"must not hold NUL or newline characters (got {value!r})"
        if len(value.encode()) > max_len:
            return f"must be at most {max_len} bytes long (got {len(value.encode())})"
        return ""
    return check


def _command(empty_ok: bool) -> Callable[[Any], str]:
    def check(value: str) -> str:
        if not value:
            return "" if empty_ok else "must name a program (got '')"
        if "\0" in value or "\n" in value:
            return f"must not hold NUL or newline characters (got {value!r})"
        return ""
    return check


def _template_name(value: str) -> str:
    # It names vmtemplates/NAME.toml and templates_dir/NAME: no path of its own.
    if value and not _TEMPLATE_NAME.fullmatch(value):
        return f"must be \"\" or a name of letters, digits, '.', '_' and '-' (got {value!r})"
    return ""


def check_template_name(name: str) -> str:
    """`name` if it can name a template (a file name under vmtemplates/ and templates_dir,
    never a path), else a ConfigError."""
    if not _TEMPLATE_NAME.fullmatch(name):
        raise ConfigError(f"invalid template name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(a letter or digit first)")
    return name


def _kernel_params(value: str) -> str:
    # Appended to a command line of ours; x86 kernels take 2048 bytes in all.
    if any(c in value for c in "\0\n"):
        return f"must not hold NUL or newline characters (got {value!r})"
    if len(value.encode()) > 1024:
        return f"must be at most 1024 bytes long (got {len(value.encode())})"
    return ""


# Every key of Config, with its rule (test_config checks none is missing).
_RULES: dict[str, _Rule] = {
    "qemu": _Rule(str, _command(empty_ok=False)),
    "virtiofsd": _Rule(str, _command(empty_ok=True)),
    "image_dir": _Rule(Path, _absolute_path()),
    # Files, not commands: relative ones would mean another file in each caller's directory.
    "kernel": _Rule(str, _absolute_path(empty_ok=True)),
    "initrd": _Rule(str, _absolute_path(empty_ok=True)),
    "kernel_params": _Rule(str, _kernel_params),
    # q35 without interrupt remapping boots at most 255 vCPUs.
    "vcpus": _Rule(int, _between(1, 255)),
    # QEMU takes the size in bytes as a 64-bit number; whether the host has it is QEMU's
    # to say (with a clear error), not ours.
    "memory_mib": _Rule(int, _between(64, 2**40)),
    "acceleration": _Rule(str, _one_of(ACCELERATIONS)),
    "run_dir": _Rule(Path, _absolute_path(_RUN_DIR_MAX)),
    "template": _Rule(str, _template_name),
    "network_model": _Rule(str, _one_of(NETWORK_MODELS)),
    "guest_kernel": _Rule(str, _one_of(GUEST_KERNELS)),
    "templates_dir": _Rule(Path, _absolute_path()),
    "pool_socket": _Rule(str, _absolute_path(_SOCKET_PATH_MAX, empty_ok=True)),
    "pool_size": _Rule(int, _between(1, 256)),
    "boot_timeout": _Rule(float, _between(0.1, 3600)),
    "log_level": _Rule(str, _one_of(LOG_LEVELS)),
}

# A template definition's settings (vmtemplates/NAME.toml), checked as vmrun.toml's are.
_TEMPLATE_RULES: dict[str, _Rule] = {
    "vcpus": _RULES["vcpus"],
    "memory_mib": _RULES["memory_mib"],
    "kernel_params": _RULES["kernel_params"],
    "hotplug_ports": _Rule(int, _between(2, 32)),  # virtio-fs and vsock at least
    "max_vcpus": _RULES["vcpus"],
    "max_memory_mib": _RULES["memory_mib"],
}

_TOML_TYPES = {str: "a string", Path: "a path string", int: "an integer", float: "a number"}


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _convert(source: str, key: str, rule: _Rule, value: object) -> object:
    """`value` as the field's type, or a ConfigError naming the key."""
    # bool is an int to Python, never to us; an int is a fine float (boot_timeout = 5).
    ok = not isinstance(value, bool) and (
        isinstance(value, str) if rule.kind in (str, Path)
        else isinstance(value, int) if rule.kind is int
        else isinstance(value, (int, float)))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_TOML_TYPES[rule.kind]}, not {_toml_type(value)} ({value!r})")
    problem = rule.check(value)
    if problem:
        raise ConfigError(f"{source}: {key} {problem}")
    if rule.kind is Path:
        return Path(value)  # type: ignore[arg-type]
    return float(value) if rule.kind is float else value  # type: ignore[arg-type]


def config_path() -> Path | None:
    """The config file in force: VMRUN_CONFIG's, else the default one if it exists (None:
    the defaults, no file)."""
    env = os.environ.get("VMRUN_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(path: Path | None = None) -> Config:
    if path is None:
        path = config_path()
        if path is None:
            return Config()
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}{_quote_line(text, str(exc))}") from None
    return config_from_dict(data, source=str(path))


def _quote_line(text: str, message: str) -> str:
    """The line a TOML error points at (tomllib says only its number), to name its key."""
    match = re.search(r"at line (\d+)", message)
    lines = text.splitlines()
    if not match or not 0 < int(match.group(1)) <= len(lines):
        return ""
    return f": {lines[int(match.group(1)) - 1].strip()[:80]!r}"


def template_settings(data: dict, source: str) -> dict[str, object]:
    """A template definition's settings, each of its type and range; one-line ConfigErrors."""
    unknown = sorted(set(data) - set(_TEMPLATE_RULES))
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}")
    return {key: _convert(source, key, _TEMPLATE_RULES[key], value) for key, value in data.items()}


def config_from_dict(data: dict, source: str = "config") -> Config:
    """A Config from a parsed vmrun.toml; every error is one line naming `source` and the key."""
    unknown = sorted(key for key in data if key.replace("-", "_") not in _RULES)
    if unknown:
        close = difflib.get_close_matches(unknown[0].replace("-", "_"), _RULES, n=1)
        raise ConfigError(f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    values: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in values:
            raise ConfigError(f"{source}: {name} is set twice (as {name} and {name.replace('_', '-')})")
        values[name] = _convert(source, key, _RULES[name], value)
    config = Config(**values)  # type: ignore[arg-type]
    if bool(config.kernel) != bool(config.initrd):
        given, missing = ("kernel", "initrd") if config.kernel else ("initrd", "kernel")
        raise ConfigError(f"{source}: {given} is set but {missing} is not: set both, or neither to use the built image")
    return config


def config_as_dict(config: Config) -> dict[str, str | int | float]:
    """The configuration as vmrun.toml would say it: every key, paths as strings."""
    return {field.name: str(value) if isinstance(value := getattr(config, field.name), Path) else value
            for field in dataclasses.fields(config)}
