"""tests/stress: soaks, run on purpose (`pytest -m stress tests/stress`), not in CI's run.
The fixtures are the integration tests' (real guests, leftovers checked)."""

from __future__ import annotations

from integration.conftest import Env, vm_env  # noqa: F401  (fixtures shared with integration tests)
