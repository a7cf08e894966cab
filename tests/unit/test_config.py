from pathlib import Path

import pytest

from vmrun.config import Config, config_from_dict, load_config
from vmrun.errors import ConfigError


def test_defaults_when_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv("VMRUN_CONFIG", raising=False)
    monkeypatch.setattr("vmrun.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config() == Config()


def test_file_from_env(monkeypatch, tmp_path):
    path = tmp_path / "vmrun.toml"
    path.write_text('vcpus = 2\nmemory_mib = 1024\nacceleration = "tcg"\nrun_dir = "/tmp/x"\nboot_timeout = 5\n')
    monkeypatch.setenv("VMRUN_CONFIG", str(path))
    config = load_config()
    assert (config.vcpus, config.memory_mib, config.acceleration) == (2, 1024, "tcg")
    assert config.run_dir == Path("/tmp/x") and config.boot_timeout == 5


def test_named_file_missing_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VMRUN_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()


@pytest.mark.parametrize("data, message", [
    ({"vcpu": 2}, "unknown setting"),
    ({"vcpus": "2"}, "must be a int"),
    ({"acceleration": "hvf"}, "acceleration must be"),
    ({"memory_mib": 8}, "memory_mib"),
    ({"run_dir": 3}, "path"),
    ({"log_level": "loud"}, "log_level"),
    ({"network_model": "macvtap"}, "network_model must be one of tcfilter, none"),
])
def test_bad_settings(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_bad_toml(monkeypatch, tmp_path):
    path = tmp_path / "vmrun.toml"
    path.write_text("vcpus = = 2")
    monkeypatch.setenv("VMRUN_CONFIG", str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config()
