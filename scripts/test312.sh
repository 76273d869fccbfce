#!/usr/bin/env bash
# The second CI stage: the suite on Python 3.12 with the newest jax and flax (what the GPU
# machines and most users have), without the torch/transformers oracles (torch's CPU build
# on these machines is for 3.11 only; an unpinned one pulls CUDA). Tests that need an
# oracle skip; the transformers-built fixtures come from the first stage (scripts/test.sh).
# Usage: bash scripts/test312.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# A python3.12 that runs: on PATH, else pyenv's (its shim refuses unless the version is selected)
python=""
for candidate in "$(command -v python3.12 || true)" "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"; do
  if [ -n "$candidate" ] && "$candidate" -c "" 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "test312: no python3.12 on this machine; skipped" >&2
  exit 0
fi
if [ ! -x .venv312/bin/python ]; then
  "$python" -m venv .venv312
fi
.venv312/bin/python -m pip install -q --upgrade pip
.venv312/bin/python -m pip install -q --upgrade "jax" "flax"
.venv312/bin/python -m pip install -q -e ".[test-core]"
if .venv312/bin/python -c "import torch" 2>/dev/null; then
  echo "test312: torch got into .venv312 (a dependency pulled it); this stage must stay torch-free" >&2
  exit 1
fi
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
.venv312/bin/python -c "import jax, flax; print(f'test312: jax {jax.__version__}, flax {flax.__version__}')"
exec .venv312/bin/python -m pytest -q -p no:cacheprovider "$@"
