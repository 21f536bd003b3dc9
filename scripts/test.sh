#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: lint, format, types, and all three test
# tiers. End-to-end tests need the real llama-server that setup builds; here a missing one is
# a failure, not a skip.
#
#   scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
export ROWER_REQUIRE_LLAMA_SERVER=1

.venv/bin/ruff check src tests scripts bench
.venv/bin/ruff format --check src tests scripts bench
.venv/bin/mypy
.venv/bin/pytest "$@"
