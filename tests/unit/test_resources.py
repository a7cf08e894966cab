"""linux.resources checked for types as runc reads them; sizes parsed as runc's --memory."""

from __future__ import annotations

import pytest

from vmrun.errors import BundleError
from vmrun.resources import check_resources, parse_size


def test_well_typed_resources_pass():
    check_resources({"memory": {"limit": 1 << 30, "swap": -1, "disableOOMKiller": False},
                     "cpu": {"quota": 50000, "period": 100000, "cpus": "0-1"}, "pids": {"limit": 100},
                     "devices": [{"allow": False, "access": "rwm"}]})
    check_resources(None)


@pytest.mark.parametrize("resources, message", [
    ({"memory": {"limit": "lots"}}, "linux.resources.memory.limit must be an integer, not 'lots'"),
    ({"memory": {"limit": 1.5}}, "memory.limit must be an integer"),
    ({"memory": {"limit": True}}, "memory.limit must be an integer"),
    ({"cpu": {"cpus": 3}}, "cpu.cpus must be a string"),
    ({"pids": 5}, "linux.resources.pids must be an object"),
    ({"memory": {"disableOOMKiller": "yes"}}, "must be true or false"),
    ([], "linux.resources must be an object"),
])
def test_a_value_of_the_wrong_type_is_named(resources, message):
    with pytest.raises(BundleError, match=message):
        check_resources(resources)


@pytest.mark.parametrize("text, size", [("1048576", 1 << 20), ("512m", 512 << 20), ("1g", 1 << 30), ("1G", 1 << 30),
                                        ("2kb", 2048), ("1.5g", 3 << 29), ("-1", -1), ("0", 0), ("64MiB", 64 << 20)])
def test_sizes_as_runc_takes_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "1x", "-5", "-1m", "1 gigabyte"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)
