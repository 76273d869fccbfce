"""LoRA adapter folders (PEFT's format) and where they go: checked when read, merged into
the weights at load (dense, bf16, a quantized GGUF, a checkpoint the family renames, on MLX),
and given to the one model `mrs serve` names; B moves between checkpoint rows and mrs's
fused layout and back. Their training is tests/test_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import mrs
from mrs import adapters
from mrs.adapters import AdapterError, LoraSettings, Piece
from mrs.cli import main
from mrs.errors import MrsError
from mrs.train import LoraModel


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


def test_bad_adapter_folders_are_refused_with_the_reason(llama, tmp_path):
    good = tmp_path / "good"
    adapters.write(good, LoraModel(llama, LoraSettings(rank=2, targets=("q_proj",))).adapter())
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        adapters.read(tmp_path)
    config = json.loads((good / "adapter_config.json").read_text())
    for key, value, reason in (("use_dora", True, "use_dora"), ("peft_type", "IA3", "only LORA"),
                               ("modules_to_save", ["lm_head"], "modules_to_save"), ("r", 3, "rank 3 needs")):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(AdapterError, match=reason):
            adapters.read(bad)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "noweights" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="safetensors only"):
        adapters.read(tmp_path / "noweights")
    other = adapters.read(good)
    other.weights = {"model.layers.9.self_attn.q_proj": next(iter(other.weights.values()))}
    adapters.write(tmp_path / "other", other)
    with pytest.raises(AdapterError, match="does not have: model.layers.9.self_attn.q_proj"):
        mrs.load(str(llama.path), adapter=tmp_path / "other")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "adapter_config.json").write_text("[]")
    (tmp_path / "list" / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="not a JSON object"):
        adapters.read(tmp_path / "list")
    wide = adapters.read(good)
    wide.weights = {m: (np.zeros((2, a.shape[1] + 1), np.float32), b) for m, (a, b) in wide.weights.items()}
    with pytest.raises(AdapterError, match="is it for another base model"):
        LoraModel(llama, LoraSettings(rank=2, targets=("q_proj",))).load_adapter(wide)


def test_a_served_model_loads_with_its_adapter_and_others_without(fixture_path, tmp_path):
    import shutil

    from mrs.engine.models import ModelManager

    seen = {}

    def loader(path, **options):
        seen[Path(path).name] = options.get("adapter")
        raise MrsError("stop here")                   # only the options matter

    models = tmp_path / "models"
    for name in ("acme--base", "acme--other"):
        shutil.copytree(fixture_path("llama"), models / name)
    manager = ModelManager(models, loader=loader, adapters={"acme/base:latest": tmp_path / "adapter"})
    for name in ("acme/base", "acme/other"):
        found = manager.resolve(name)
        with pytest.raises(MrsError, match="stop here"):
            manager._load(*found)
    assert seen == {"acme--base": tmp_path / "adapter", "acme--other": None}


@pytest.mark.parametrize("piece", [
    Piece("q", (2, 3, 4), axis=1, start=0, stop=3),
    Piece("in_proj", (2, 6)),
    Piece("qkv", (2, 4, 3), stacked=((2, 2, 3), (2, 1, 3), (2, 1, 3)), stacked_axis=1),   # Phi-3: rows q|k|v
])
def test_b_moves_between_checkpoint_rows_and_mrs_layout_and_back(piece):
    rows = np.arange(piece.rows * 5, dtype=np.float32).reshape(piece.rows, 5)
    model = piece.to_model(rows)
    assert model.shape == piece.lead + (5,)
    np.testing.assert_array_equal(piece.to_checkpoint(model), rows)
    if piece.stacked:       # the k rows (after q's 2x2x3) land in each kv head's third slot
        np.testing.assert_array_equal(model[0, 2], rows[12:15])
        np.testing.assert_array_equal(model[1, 2], rows[15:18])


@pytest.fixture
def random_adapter(llama, tmp_path) -> Path:
    """An adapter with random, non-zero factors on q/v/down of the llama fixture."""
    lora = LoraModel(llama, LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                    lora.params)
    return adapters.write(tmp_path / "random-adapter", lora.adapter(params))


def test_an_adapter_on_a_quantized_gguf_reads_its_targets_dense_and_merges(llama, random_adapter, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_fixtures import write_gguf

    path = write_gguf(llama.path, tmp_path / "llama-q8.gguf", "llama", "Q8_0")
    plain, adapted = mrs.load(path), mrs.load(path, adapter=random_adapter)
    count = lambda model: sum(model.quantization.values())  # noqa: E731
    assert 0 < count(adapted) < count(plain)                  # q/k/v and gate/up/down fused: those stay dense
    dense = mrs.load(path, dequantize=True, adapter=random_adapter)
    ids = np.array([[1, 5, 7, 9, 11, 13, 40, 41]], np.int32)
    assert np.abs(adapted.logits(ids) - plain.logits(ids)).max() > 1e-2
    np.testing.assert_allclose(adapted.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)


def test_an_adapter_runs_on_mlx_as_on_jax(llama, random_adapter):
    pytest.importorskip("mlx.core")
    ids = np.array([[1, 5, 7, 9, 11, 13, 40, 41]], np.int32)
    on_mlx = mrs.load(str(llama.path), device="mlx", adapter=random_adapter)
    np.testing.assert_allclose(on_mlx.logits(ids), mrs.load(str(llama.path), adapter=random_adapter).logits(ids),
                               atol=1e-4, rtol=0)


def test_serve_takes_an_adapter_for_exactly_one_model(fixture_path, random_adapter, capsys):
    assert main(["serve", "--adapter", str(random_adapter)]) == 1
    assert "--adapter needs exactly one --model" in capsys.readouterr().err
    assert main(["serve", "--model", str(fixture_path("llama")), "--adapter", str(fixture_path("llama"))]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


def test_an_adapter_merges_into_a_bfloat16_checkpoint_at_load_and_by_mrs_merge(llama, random_adapter, tmp_path):
    import shutil

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from mrs.merge import write_merged

    folder = tmp_path / "bf16"
    shutil.copytree(llama.path, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, folder / "model.safetensors")
    ids = np.array([[1, 5, 7, 9, 11, 13, 40, 41]], np.int32)
    adapted = mrs.load(str(folder), adapter=random_adapter).logits(ids)
    assert np.abs(adapted - mrs.load(str(folder)).logits(ids)).max() > 1e-2
    write_merged(folder, adapters.read(random_adapter), tmp_path / "merged")
    assert load_file(tmp_path / "merged" / "model.safetensors")["model.norm.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(mrs.load(str(tmp_path / "merged")).logits(ids), adapted)


def test_an_adapter_finds_its_modules_in_a_checkpoint_the_family_renames(fixture_path, tmp_path):
    """Gemma 3 cut from its multimodal model stores language_model.model.*; the adapter names model.*."""
    import shutil

    from safetensors.numpy import load_file, save_file

    plain = mrs.load(str(fixture_path("gemma3")))
    lora = LoraModel(plain, LoraSettings(rank=2, targets=("q_proj", "down_proj")))
    params = jax.tree_util.tree_map(lambda x: x + 0.05, lora.params)
    folder = adapters.write(tmp_path / "adapter", lora.adapter(params))
    renamed = tmp_path / "renamed"
    shutil.copytree(fixture_path("gemma3"), renamed)
    tensors = load_file(renamed / "model.safetensors")
    save_file({k.replace("model.", "language_model.model.", 1): v for k, v in tensors.items()},
              renamed / "model.safetensors")
    ids = np.array([[1, 5, 7, 9, 11, 13, 40, 41]], np.int32)
    np.testing.assert_allclose(mrs.load(str(renamed), adapter=folder).logits(ids),
                               mrs.load(str(fixture_path("gemma3")), adapter=folder).logits(ids), atol=1e-5, rtol=0)


def test_the_app_serves_its_default_model_with_the_adapter(fixture_path, random_adapter, tmp_path):
    from mrs.config import Settings
    from mrs.server.app import build_app

    app = build_app(Settings.load(home=tmp_path), [str(fixture_path("llama"))], adapter=random_adapter)
    assert app.ctx.adapters == {"llama": random_adapter} and app.ctx.default_models == ["llama"]
