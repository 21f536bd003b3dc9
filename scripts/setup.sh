#!/usr/bin/env bash
# Set up everything Rower's development and tests need, on a fresh Debian machine with
# Python >= 3.11. Idempotent: run it again at any time; finished steps take seconds.
#
#   scripts/setup.sh
#
# 1. C/C++ toolchain (gcc, g++, cmake, make) from Debian packages, only when missing.
#    1b. Chromium (Debian package) for the web dashboard tests, only when missing.
# 2. .venv in the repo, with `pip install -e '.[dev,bench]'` pinned by requirements/constraints.txt.
# 3. llama-server, built from source and cached (scripts/build_llama_server.py, ~6 min once).
# 4. The tiny test model, cached (scripts/make_tiny_model.py, a few seconds once).
#
# Environment: PYTHON (default python3), ROWER_CACHE_DIR (default ~/.cache/rower),
# ROWER_BUILD_JOBS (default 2).
set -euo pipefail

# --python-only: just the .venv (what the `rower sim` demo needs), no toolchain, browser or
# llama-server build.
python_only=0
[ "${1:-}" = "--python-only" ] && python_only=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS
python=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- 1. toolchain -------------------------------------------------------------------------
missing=()
[ $python_only -eq 1 ] || for tool in gcc g++ cmake make; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ! -x .venv/bin/python ] && ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv) # Debian's python3 has no ensurepip (so no venv) without it
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- 1b. Chromium for the web dashboard tests (observability) ------------------------------
# Debian's package; Playwright (in the dev extra) drives it. Never `playwright install`.
if [ $python_only -eq 0 ] && ! command -v chromium >/dev/null 2>&1; then
    say "installing Debian package: chromium"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
# --- end of 1b ------------------------------------------------------------------------------

# --- 2. Python environment ----------------------------------------------------------------
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { say "need Python >= 3.11, $python is $("$python" --version 2>&1)"; exit 1; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$python" -m venv .venv
fi
# Reinstall only when the pins changed since the last successful install.
stamp=.venv/.rower-setup-stamp
wanted=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    say "installing rower[dev,bench] into .venv"
    .venv/bin/python -m pip install --disable-pip-version-check --quiet \
        -c requirements/constraints.txt -e '.[dev,bench]'
    echo "$wanted" >"$stamp"
fi

# --- 3 and 4. llama-server and the tiny model -----------------------------------------------
if [ $python_only -eq 1 ]; then
    say "Python environment ready in .venv ($((SECONDS - started)) s)"
    exit 0
fi
llama_server=$(.venv/bin/python scripts/build_llama_server.py)
tiny_model=$(.venv/bin/python scripts/make_tiny_model.py)

cat <<EOF
Rower development environment ready ($((SECONDS - started)) s).
  python:        $(.venv/bin/python --version) in .venv
  llama-server:  $llama_server
  tiny model:    $tiny_model
Run the tests:   .venv/bin/pytest            (end-to-end only: .venv/bin/pytest -m e2e)
EOF
