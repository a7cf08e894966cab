"""vmrun's configuration: /etc/vmrun/vmrun.toml, or the file VMRUN_CONFIG names.

Every key is optional; a missing file means the defaults. Unknown keys and wrong types are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/vmrun/vmrun.toml")
ACCELERATIONS = ("auto", "kvm", "tcg")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETWORK_MODELS = ("tcfilter", "none")


@dataclass(frozen=True)
class Config:
    # QEMU and its helpers; empty means "find it".
    qemu: str = "qemu-system-x86_64"
    virtiofsd: str = ""
    # Guest image: built by `vmrun image build` into image_dir, unless kernel and initrd
    # are given explicitly.
    image_dir: Path = Path("/var/lib/vmrun/image")
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


_PATH_FIELDS = {"image_dir", "run_dir", "templates_dir"}


def load_config(path: Path | None = None) -> Config:
    if path is None:
        env = os.environ.get("VMRUN_CONFIG")
        path = Path(env) if env else DEFAULT_CONFIG_PATH
        if not env and not path.exists():
            return Config()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return config_from_dict(data, source=str(path))


def config_from_dict(data: dict, source: str = "config") -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        default = getattr(Config, name)
        if name in _PATH_FIELDS:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a path string")
            value = Path(value)
        elif isinstance(default, bool) or not isinstance(value, type(default)):
            if not (isinstance(default, float) and isinstance(value, int)):
                raise ConfigError(f"{source}: {key} must be a {type(default).__name__}")
        values[name] = value
    config = Config(**values)
    if config.acceleration not in ACCELERATIONS:
        raise ConfigError(f"{source}: acceleration must be one of {', '.join(ACCELERATIONS)}")
    if config.network_model not in NETWORK_MODELS:
        raise ConfigError(f"{source}: network_model must be one of {', '.join(NETWORK_MODELS)}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(LOG_LEVELS)}")
    if config.vcpus < 1 or config.memory_mib < 64:
        raise ConfigError(f"{source}: vcpus must be >= 1 and memory_mib >= 64")
    return config
