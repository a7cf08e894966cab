#!/usr/bin/env bash
# Set up (idempotent) and run every test: unit tests and integration tests that boot real guests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -v -rs "$@" tests
