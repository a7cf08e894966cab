"""The vmrun guest kernel's configuration checks and cache key (guest/kernel_build.py)."""

from pathlib import Path

import pytest

from guest import kernel_build
from guest.kernel_build import SourceEdit, apply_source_edits, kernel_key, missing_options, wanted_options

FRAGMENT = """\
# a comment
CONFIG_VIRTIO_PMEM=y

CONFIG_MODULES=n
CONFIG_NR_CPUS=64
"""


def test_wanted_options_are_the_fragments_assignments():
    assert wanted_options(FRAGMENT) == {"CONFIG_VIRTIO_PMEM": "y", "CONFIG_MODULES": "n", "CONFIG_NR_CPUS": "64"}


def test_a_config_with_everything_wanted_misses_nothing():
    config = "CONFIG_VIRTIO_PMEM=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=64\nCONFIG_OTHER=y\n"
    assert missing_options(wanted_options(FRAGMENT), config) == []


def test_options_kconfig_dropped_or_changed_are_named():
    # VIRTIO_PMEM lost (an unmet dependency), MODULES forced on, NR_CPUS clamped.
    config = "CONFIG_MODULES=y\nCONFIG_NR_CPUS=8\n"
    assert missing_options(wanted_options(FRAGMENT), config) == [
        "CONFIG_MODULES=n (is y)",
        "CONFIG_NR_CPUS=64 (is 8)",
        "CONFIG_VIRTIO_PMEM=y (is unset)",
    ]


def test_the_key_follows_the_source_version_and_the_fragment():
    key = kernel_key("6.1.192-3", FRAGMENT)
    assert key == kernel_key("6.1.192-3", FRAGMENT)
    assert key != kernel_key("6.1.193-1", FRAGMENT)
    assert key != kernel_key("6.1.192-3", FRAGMENT + "CONFIG_IPV6=y\n")


def test_the_key_follows_the_source_edits():
    edit = SourceEdit("include/x.h", "#define A 4", "#define A 16")
    assert kernel_key("6.1.192-3", FRAGMENT, (edit,)) != kernel_key("6.1.192-3", FRAGMENT, ())
    assert kernel_key("6.1.192-3", FRAGMENT, (edit,)) != kernel_key(
        "6.1.192-3", FRAGMENT, (SourceEdit("include/x.h", "#define A 4", "#define A 64"),))


def test_a_source_edit_changes_its_text_once(tmp_path):
    (tmp_path / "include").mkdir()
    header = tmp_path / "include" / "x.h"
    header.write_text("#define A\tSIZE(1024 * 4)\n#define B 1\n")
    apply_source_edits(tmp_path, (SourceEdit("include/x.h", "A\tSIZE(1024 * 4)", "A\tSIZE(1024 * 16)"),))
    assert header.read_text() == "#define A\tSIZE(1024 * 16)\n#define B 1\n"


@pytest.mark.parametrize("text, found", [("#define B 1\n", 0), ("#define A 4\n#define A 4\n", 2)])
def test_a_source_edit_whose_text_is_not_there_once_stops_the_build(tmp_path, text, found):
    (tmp_path / "x.h").write_text(text)
    with pytest.raises(kernel_build.ImageError, match=f"{found} times, not once"):
        apply_source_edits(tmp_path, (SourceEdit("x.h", "#define A 4", "#define A 16"),))
    assert (tmp_path / "x.h").read_text() == text  # left as it was


def test_a_source_edit_of_a_missing_file_stops_the_build(tmp_path):
    with pytest.raises(kernel_build.ImageError, match="cannot read x.h"):
        apply_source_edits(tmp_path, (SourceEdit("x.h", "a", "b"),))


def test_the_shipped_fragment_builds_in_what_the_guest_boots_from():
    wanted = wanted_options(kernel_build.CONFIG_FRAGMENT.read_text())
    for option in ("CONFIG_PVH", "CONFIG_VIRTIO_PMEM", "CONFIG_FS_DAX", "CONFIG_EROFS_FS", "CONFIG_VIRTIO_VSOCKETS",
                   "CONFIG_VIRTIO_FS", "CONFIG_OVERLAY_FS", "CONFIG_CGROUP_BPF", "CONFIG_SECCOMP_FILTER"):
        assert wanted.get(option) == "y", option
    assert wanted["CONFIG_MODULES"] == "n"


def test_a_cached_kernel_is_used_without_building(tmp_path, monkeypatch):
    key = kernel_key("1.0", kernel_build.CONFIG_FRAGMENT.read_text())
    (tmp_path / key).mkdir()
    (tmp_path / key / "vmlinux").write_bytes(b"ELF")

    def no_build(*args, **kwargs):
        raise AssertionError("built although cached")

    monkeypatch.setattr(kernel_build, "_unpack_source", no_build)
    assert kernel_build.build_kernel(Path("/nonexistent.deb"), "1.0", tmp_path, print) == tmp_path / key / "vmlinux"


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def unpack(source_deb, work, log):
        (work / "linux-source-6.1").mkdir()
        raise kernel_build.ImageError("cannot unpack")

    monkeypatch.setattr(kernel_build, "_unpack_source", unpack)
    with pytest.raises(kernel_build.ImageError):
        kernel_build.build_kernel(Path("/nonexistent.deb"), "1.0", tmp_path, lambda m: None)
    assert list(tmp_path.iterdir()) == []
