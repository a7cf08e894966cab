"""tests/faults kills vmrun's own processes on purpose, while a container runs, and checks
that the failure ends well: the container reads stopped, callers get an answer, and delete
leaves nothing. The fixtures are the integration tests' (real guests, leftovers checked)."""

from __future__ import annotations

import pytest

from integration.conftest import Env, vm_env  # noqa: F401  (fixtures shared with integration tests)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "faults" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
