"""Parameters as the backends see them: a spec with logical axes for every tensor, fused
projections that keep a heads axis, packed entries, and projection variants chosen by
parameter path (the one place quantized, LoRA and sharded layers plug in)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import mrs
from mrs.archs.layers import Linear
from mrs.cache import KVCache, SSMCache
from mrs.weights import ParamSpec, load_params

AXES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "qkv", "mlp", "gate_up", "positions", "token_types",
        "inner", "xz", "dt_bc", "dt_rank", "state", "conv", "conv_group"}


@pytest.fixture(scope="module")
def loaded(fixture_path):
    cache: dict[str, mrs.Model] = {}

    def get(name: str) -> mrs.Model:
        if name not in cache:
            cache[name] = mrs.load(str(fixture_path(name)))
        return cache[name]

    return get


def test_every_parameter_of_every_family_names_its_logical_axes(loaded, fixture_name):
    model = loaded(fixture_name)
    spec = model.runner.spec
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.State(model.runner.params))}
    assert set(spec) == set(flat)
    for name, entry in spec.items():
        assert len(entry.axes) == len(entry.shape) == flat[name].ndim, name
        assert set(entry.axes) <= AXES, (name, entry.axes)
        assert tuple(flat[name].shape) == entry.shape


def test_caches_name_the_axes_of_their_leaves(loaded):
    for name, kind in (("llama", KVCache), ("mamba", SSMCache)):
        cache = loaded(name).init_cache(2, 32)
        assert isinstance(cache, kind)
        for field, axes in kind.AXES.items():
            leaves = getattr(cache, field)
            for leaf in leaves if isinstance(leaves, tuple) else (leaves,):
                assert leaf.ndim == len(axes) and axes[0] == "slots", (field, axes)


def test_fused_qkv_keeps_a_head_group_axis_and_gate_up_a_parts_axis(loaded, fixture_path):
    """q, k or v alone is a slice of qkv_proj [K, G + 2, H, D]; gate or up of gate_up_proj [2, F, D]."""
    model = loaded("qwen2")    # GQA with biases: the bias follows the same layout
    cfg = model.config
    N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    G = N // K
    checkpoint = load_file(fixture_path("qwen2") / "model.safetensors")
    layer = model.runner.params["model"]["layers"][1]
    qkv, qkv_bias = np.asarray(layer["self_attn"]["qkv_proj"]["weight"]), np.asarray(
        layer["self_attn"]["qkv_proj"]["bias"])
    assert qkv.shape == (K, G + 2, H, D) and model.runner.spec["model.layers.1.self_attn.qkv_proj.weight"].axes == (
        "kv_heads", "qkv", "head_dim", "embed")
    prefix = "model.layers.1.self_attn."
    np.testing.assert_array_equal(qkv[:, :G].reshape(N * H, D), checkpoint[prefix + "q_proj.weight"])
    np.testing.assert_array_equal(qkv[:, G], checkpoint[prefix + "k_proj.weight"].reshape(K, H, D))
    np.testing.assert_array_equal(qkv[:, G + 1], checkpoint[prefix + "v_proj.weight"].reshape(K, H, D))
    np.testing.assert_array_equal(qkv_bias[:, G + 1], checkpoint[prefix + "v_proj.bias"].reshape(K, H))
    gate_up = np.asarray(layer["mlp"]["gate_up_proj"]["weight"])
    np.testing.assert_array_equal(gate_up[0], checkpoint["model.layers.1.mlp.gate_proj.weight"])
    np.testing.assert_array_equal(gate_up[1], checkpoint["model.layers.1.mlp.up_proj.weight"])


def test_phi3s_row_stacked_checkpoint_tensors_load_into_the_same_per_head_layout(loaded, fixture_path):
    model = loaded("phi3")
    cfg = model.config
    N, K, H, D, F = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                     cfg.intermediate_size)
    G = N // K
    checkpoint = load_file(fixture_path("phi3") / "model.safetensors")
    stacked = checkpoint["model.layers.0.self_attn.qkv_proj.weight"]               # [(N + 2K) H, D]
    qkv = np.asarray(model.runner.params["model"]["layers"][0]["self_attn"]["qkv_proj"]["weight"])
    np.testing.assert_array_equal(qkv[:, :G].reshape(N * H, D), stacked[:N * H])
    np.testing.assert_array_equal(qkv[:, G].reshape(K * H, D), stacked[N * H:(N + K) * H])
    gate_up = np.asarray(model.runner.params["model"]["layers"][0]["mlp"]["gate_up_proj"]["weight"])
    np.testing.assert_array_equal(gate_up.reshape(2 * F, D), checkpoint["model.layers.0.mlp.gate_up_proj.weight"])


def test_packed_integer_entries_of_the_spec_load_as_stored(tmp_path):
    """A quantized format's packed codes are legal spec entries: checked, never cast."""
    codes = np.arange(24, dtype=np.uint32).reshape(4, 6)
    save_file({"layer.weight": codes, "layer.scales": np.ones((4, 2), np.float32)}, tmp_path / "model.safetensors")
    spec = {"layer.weight": ParamSpec((4, 6), np.uint32, ("mlp", "embed")),
            "layer.scales": ParamSpec((4, 2), np.float32, ("mlp", "embed"))}
    arrays = load_params(tmp_path, spec, np.float16)
    assert arrays["layer.weight"].dtype == np.uint32 and arrays["layer.scales"].dtype == np.float16
    np.testing.assert_array_equal(arrays["layer.weight"], codes)
    with pytest.raises(ValueError, match="axes"):
        ParamSpec((4, 6), np.uint32, ("mlp",))


class Doubled(Linear):
    """A stand-in projection variant: the dense result, doubled."""

    def __call__(self, x):
        return 2 * super().__call__(x)


def test_a_variant_replaces_exactly_the_projections_its_predicate_names(loaded, fixture_path):
    plain = loaded("llama")
    seen: list[str] = []

    def variant(path, layer):
        seen.append(path)
        if path.endswith("mlp.down_proj"):
            new = nnx.eval_shape(lambda: Doubled(layer.weight.shape[1], layer.weight.shape[0], bias=False,
                                                 dtype=layer.weight.dtype, axes=("embed", "mlp")))
            return new
        return None

    doubled = mrs.load(str(fixture_path("llama")), variant=variant)
    layers = plain.config.num_hidden_layers
    assert sum(p.endswith("down_proj") for p in seen) == layers
    assert "model.embed_tokens" in seen and any(p.endswith("self_attn.qkv_proj") for p in seen)   # tied heads too
    ids = np.array([[1, 5, 9, 13, 2]], np.int32)
    assert np.abs(doubled.logits(ids) - plain.logits(ids)).max() > 1e-3

    # The same swap with plain Linear layers changes nothing: the variant is the only difference.
    def same(path, layer):
        return nnx.eval_shape(lambda: Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False,
                                             dtype=layer.weight.dtype, axes=("embed", "mlp"))) \
            if path.endswith("mlp.down_proj") else None

    np.testing.assert_array_equal(mrs.load(str(fixture_path("llama")), variant=same).logits(ids), plain.logits(ids))
