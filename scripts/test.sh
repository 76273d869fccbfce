#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs): bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
