import dataclasses
from pathlib import Path

import pytest

from vmrun.config import _RULES, Config, config_as_dict, config_from_dict, load_config
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
    assert isinstance(config.boot_timeout, float)


def test_named_file_missing_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VMRUN_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()


def test_every_key_has_a_rule():
    assert set(_RULES) == {f.name for f in dataclasses.fields(Config)}


def test_the_defaults_pass_their_own_rules():
    assert config_from_dict(config_as_dict(Config())) == Config()


def test_every_key_set_round_trips():
    data = {"qemu": "/usr/bin/qemu-system-x86_64", "virtiofsd": "/usr/libexec/virtiofsd",
            "image_dir": "/srv/image", "guest_kernel": "debian", "kernel": "/boot/k", "initrd": "/boot/i", "kernel_params": "quiet",
            "vcpus": 4, "memory_mib": 2048, "acceleration": "kvm", "run_dir": "/run/v", "template": "big-1.0",
            "network_model": "none", "templates_dir": "/srv/templates", "pool_socket": "/run/pool.sock",
            "pool_size": 8, "boot_timeout": 2.5, "log_level": "debug"}
    assert set(data) == set(_RULES)
    config = config_from_dict(data)
    assert config_as_dict(config) == data


def test_dashes_are_underscores():
    assert config_from_dict({"memory-mib": 128}).memory_mib == 128
    with pytest.raises(ConfigError, match="set twice"):
        config_from_dict({"memory-mib": 128, "memory_mib": 256})


# Wrong types: a string where an int belongs, booleans (ints to Python), floats, tables.
@pytest.mark.parametrize("data, message", [
    ({"vcpus": "2"}, "vcpus must be an integer, not a string"),
    ({"vcpus": True}, "vcpus must be an integer, not a boolean"),
    ({"vcpus": 1.5}, "vcpus must be an integer, not a float"),
    ({"memory_mib": "512M"}, "memory_mib must be an integer"),
    ({"pool_size": [2]}, "pool_size must be an integer, not an array"),
    ({"boot_timeout": "60"}, "boot_timeout must be a number"),
    ({"boot_timeout": False}, "boot_timeout must be a number, not a boolean"),
    ({"run_dir": 3}, "run_dir must be a path string, not an integer"),
    ({"image_dir": {"a": 1}}, "image_dir must be a path string, not a table"),
    ({"templates_dir": True}, "templates_dir must be a path string"),
    ({"qemu": 1}, "qemu must be a string"),
    ({"virtiofsd": 1}, "virtiofsd must be a string"),
    ({"kernel": 1}, "kernel must be a string"),
    ({"initrd": 1}, "initrd must be a string"),
    ({"kernel_params": ["a"]}, "kernel_params must be a string"),
    ({"acceleration": 1}, "acceleration must be a string"),
    ({"template": 0}, "template must be a string"),
    ({"network_model": None}, "network_model must be a string"),
    ({"pool_socket": 1}, "pool_socket must be a string"),
    ({"log_level": 10}, "log_level must be a string"),
])
def test_wrong_types(data, message):
    with pytest.raises(ConfigError, match=f"^vmrun.toml: {message}"):
        config_from_dict(data, source="vmrun.toml")


# Out of range, or not one of the choices.
@pytest.mark.parametrize("data, message", [
    ({"memory_mib": 12}, r"memory_mib must be >= 64 \(got 12\)"),
    ({"memory_mib": 2**41}, "memory_mib must be <= "),
    ({"vcpus": 0}, r"vcpus must be >= 1 \(got 0\)"),
    ({"vcpus": 256}, r"vcpus must be <= 255 \(got 256\)"),
    ({"pool_size": 0}, "pool_size must be >= 1"),
    ({"pool_size": 1000}, "pool_size must be <= 256"),
    ({"boot_timeout": 0}, "boot_timeout must be >= 0.1"),
    ({"boot_timeout": -5.0}, "boot_timeout must be >= 0.1"),
    ({"boot_timeout": 1e9}, "boot_timeout must be <= 3600"),
    ({"boot_timeout": float("nan")}, "boot_timeout must be a number from 0.1 to 3600"),
    ({"kernel": "vmlinux", "initrd": "/i"}, "kernel must be an absolute path"),
    ({"acceleration": "hvf"}, "acceleration must be one of auto, kvm, tcg"),
    ({"network_model": "macvtap"}, "network_model must be one of tcfilter, none"),
    ({"guest_kernel": "custom"}, "guest_kernel must be one of vmrun, debian"),
    ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
    ({"qemu": ""}, "qemu must name a program"),
    ({"virtiofsd": "a\nb"}, "virtiofsd must not hold NUL or newline"),
    ({"run_dir": "run"}, "run_dir must be an absolute path"),
    ({"run_dir": "/" + "r" * 60}, "run_dir must be at most 54 bytes long"),
    ({"image_dir": ""}, "image_dir must be an absolute path"),
    ({"templates_dir": "templates"}, "templates_dir must be an absolute path"),
    ({"pool_socket": "pool.sock"}, "pool_socket must be an absolute path"),
    ({"pool_socket": "/" + "p" * 120}, "pool_socket must be at most 107 bytes"),
    ({"template": "../etc"}, "template must be"),
    ({"template": "a/b"}, "template must be"),
    ({"kernel_params": "x" * 2000}, "kernel_params must be at most 1024 bytes"),
    ({"kernel_params": "a\nb"}, "kernel_params must not hold"),
    ({"kernel": "/boot/k"}, "kernel is set but initrd is not"),
    ({"initrd": "/boot/i"}, "initrd is set but kernel is not"),
])
def test_out_of_range(data, message):
    with pytest.raises(ConfigError, match=f"^vmrun.toml: {message}"):
        config_from_dict(data, source="vmrun.toml")


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^vmrun.toml: unknown setting 'memory_mb' \(did you mean 'memory_mib'\?\)"):
        config_from_dict({"memory_mb": 128}, source="vmrun.toml")
    with pytest.raises(ConfigError, match="unknown settings 'a', 'b'"):
        config_from_dict({"b": 1, "a": 2, "vcpus": 1})
    with pytest.raises(ConfigError, match="unknown setting 'sandbox'"):
        config_from_dict({"sandbox": {"vcpus": 2}})  # a [sandbox] table


def test_accepted_edges():
    config = config_from_dict({"vcpus": 255, "memory_mib": 64, "boot_timeout": 1, "template": "",
                               "pool_socket": "", "run_dir": "/" + "r" * 53})
    assert (config.vcpus, config.memory_mib, config.template) == (255, 64, "")


def test_errors_are_one_line():
    for data in ({"virtiofsd": "a\nb"}, {"template": "x\ny"}, {"acceleration": "a\nb"}, {"vcpus": "1\n2"}):
        with pytest.raises(ConfigError) as info:
            config_from_dict(data)
        assert "\n" not in str(info.value)


def test_bad_toml_names_the_file_and_line(monkeypatch, tmp_path):
    path = tmp_path / "vmrun.toml"
    path.write_text("vcpus = 1\nmemory_mib = = 2\n")
    monkeypatch.setenv("VMRUN_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert message.startswith(f"{path}: not valid TOML") and "memory_mib = = 2" in message and "\n" not in message


def test_file_errors_name_the_file(monkeypatch, tmp_path):
    path = tmp_path / "vmrun.toml"
    path.write_text("memory_mib = 12\n")
    with pytest.raises(ConfigError, match=f"^{path}: memory_mib must be >= 64"):
        load_config(path)
    path.write_bytes(b"qemu = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
