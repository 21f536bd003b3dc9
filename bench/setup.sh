#!/usr/bin/env bash
# Benchmark prerequisites: the bench extra (matplotlib), and nginx, HAProxy and wrk from the
# distribution's packages when missing. Idempotent; needs root (or sudo) only to install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    scripts/setup.sh
fi
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q -e '.[bench]'

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "bench/setup.sh: installing ${missing[*]}" >&2
    # Another apt may be running (unattended upgrades): wait for its lock rather than fail.
    apt_get() { $sudo apt-get -o DPkg::Lock::Timeout=300 "$@"; }
    if ! apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt_get update -qq >/dev/null && apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || echo "bench/setup.sh: could not install ${missing[*]}; those baselines are skipped" >&2
    fi
fi
