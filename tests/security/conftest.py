"""tests/security plays the attacker: root in the guest, with every capability, no seccomp,
entered into the namespaces of the guest's PID 1 (what a container escape in the guest
gives), or a guest kernel that writes what it likes on its devices. Each test checks, from
the host, that nothing crossed the boundary.

The fixtures are the integration tests' (real guests, and a check that nothing is left).
"""

from __future__ import annotations

import pytest

from integration.conftest import Env, vm_env  # noqa: F401  (fixtures shared with integration tests)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "security" in str(item.fspath) and "unit" not in item.keywords:
            item.add_marker(pytest.mark.integration)
