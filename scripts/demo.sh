#!/usr/bin/env bash
# Set up (idempotent) and start a demo fleet on 127.0.0.1: a balancer with its web dashboard,
# two agents and two servers, then send a request through it. Ctrl-C stops everything.
#
#   scripts/demo.sh           # two `rower sim` servers (seconds to set up)
#   scripts/demo.sh --real    # two real llama-servers with the tiny model (first run builds
#                             # llama-server: ~6 min on 2 cores, then cached)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = "--real" ]; then
    scripts/setup.sh >&2
else
    scripts/setup.sh --python-only >&2
fi
exec .venv/bin/python scripts/demo.py "$@"
