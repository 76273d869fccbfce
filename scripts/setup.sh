#!/usr/bin/env bash
# Create .venv (if missing) and install mrs with the given extras, offline-friendly:
# torch is pinned to the CPU build (a test oracle only), so no CUDA wheels are pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
