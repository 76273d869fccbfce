"""Mamba-1: parity with transformers (logits, greedy alone and in a mixed-length batch),
the chunked scan against its step-by-step definition, padding and fresh-slot state
semantics of the SSM cache, constant state size over long generations, typed errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mrs
from mrs.archs.mamba import MambaConfig
from mrs.cache import SSMCache
from mrs.engine.generate import RunResult, run
from mrs.errors import UnsupportedModelError, WeightsError
from mrs.kernels.scan import (
    selective_scan,
    selective_scan_loop,
    selective_scan_reference,
)

LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def mamba(fixture_path):
    path = fixture_path("mamba")
    return mrs.load(str(path), dtype="float32", device="cpu"), dict(np.load(path / "golden.npz"))


def test_logits_match_transformers(mamba):
    model, golden = mamba
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)


def test_greedy_tokens_match_transformers_alone_and_in_a_mixed_length_batch(mamba):
    model, golden = mamba
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    alone = mrs.generate(model, prompts[2], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert alone.token_ids == golden["greedy_2"].tolist()
    batch = mrs.generate_batch(model, prompts, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, completion in enumerate(batch):
        assert completion.token_ids == golden[f"greedy_{i}"].tolist(), f"row {i} differs from its batch-1 run"


def test_stream_yields_the_text_generate_returns(mamba):
    model, golden = mamba
    prompt = golden["prompt_2"][0].tolist()
    text = "".join(mrs.stream(model, prompt, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert text == model.tokenizer.decode(golden["greedy_2"].tolist())


def test_new_prompts_of_warm_shapes_do_not_recompile(mamba):
    model, golden = mamba
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    mrs.generate_batch(model, prompts, max_tokens=8, temperature=0, ignore_eos=True)
    warm = model.steps.compiled_count()
    mrs.generate_batch(model, [p[::-1] for p in prompts[::-1]], max_tokens=8, temperature=0.7, seed=1)
    mrs.generate_batch(model, [prompts[1][:5], prompts[0], prompts[2][1:] + prompts[2][:1]], max_tokens=8,
                       temperature=0)
    assert model.steps.compiled_count() == warm


def test_state_size_is_constant_and_512_tokens_generate(mamba):
    model, golden = mamba
    nbytes = [sum(x.nbytes for x in jax.tree_util.tree_leaves(model.init_cache(1, n))) for n in (256, 1 << 16)]
    assert nbytes[0] == nbytes[1]
    prompt = golden["prompt_0"][0].tolist()
    result = next(e for e in run(model, [prompt], max_tokens=512, temperature=0, ignore_eos=True)
                  if isinstance(e, RunResult))
    completion = result.completions[0]
    assert completion.completion_tokens == 512 and completion.finish_reason == "length"
    assert completion.token_ids[:NEW_TOKENS] == golden["greedy_0"].tolist()
    fresh = model.init_cache(1, 16)
    assert [x.shape for x in jax.tree_util.tree_leaves(result.cache)] == \
        [x.shape for x in jax.tree_util.tree_leaves(fresh)]
    assert int(result.cache.lengths[0]) == len(prompt) + 511      # the last sampled token is never fed


def _scan_inputs(batch, steps, inner=12, state=4, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    dt = jax.nn.softplus(f(batch, steps, inner) - 1.0)
    dt = dt.at[0, steps - 3:].set(0.0)                   # row 0 ends in padding (dt = 0)
    return (f(batch, steps, inner), dt, -jnp.exp(f(inner, state)), f(batch, steps, state), f(batch, steps, state),
            f(inner), f(batch, steps, inner), f(batch, inner, state))


@pytest.mark.parametrize("steps", [1, 7, 21])
def test_chunked_scan_matches_the_step_by_step_definition(steps):
    args = _scan_inputs(2, steps)
    y_ref, h_ref = jax.jit(selective_scan_loop)(*args)
    for fn in (selective_scan_reference, selective_scan):
        y, h = jax.jit(fn)(*args)
        np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    if steps > 3:   # padding steps (dt = 0) leave the state where the last valid step put it
        _, h_valid = jax.jit(selective_scan_loop)(*(a[:, :steps - 3] if a.ndim == 3 and a.shape[1] == steps else a
                                                    for a in args))
        np.testing.assert_allclose(h[0], h_valid[0], atol=1e-5, rtol=1e-5)


def test_padded_prefill_leaves_the_same_state_as_an_unpadded_one_and_slots_restart_at_position_0(mamba):
    model, golden = mamba
    ids = golden["logits_ids"][0]
    width, valid = 24, 5
    tokens = np.stack([ids[:width], np.r_[ids[:valid], np.zeros(width - valid, ids.dtype)]]).astype(np.int32)
    positions = np.stack([np.arange(width), np.where(np.arange(width) < valid, np.arange(width), -1)])
    positions = jnp.asarray(positions, jnp.int32)
    cache = model.init_cache(2, width)
    logits, cache = model.runner.compiled().forward(model.runner.params, jnp.asarray(tokens), positions, cache)
    alone, alone_cache = model.runner.compiled().forward(model.runner.params, jnp.asarray(tokens[1:2, :valid]),
                                                         positions[1:2, :valid], model.init_cache(1, width))
    np.testing.assert_allclose(np.asarray(logits)[1, :valid], np.asarray(alone)[0], atol=LOGITS_TOLERANCE, rtol=0)
    for padded, unpadded in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(alone_cache)):
        np.testing.assert_allclose(np.asarray(padded)[1], np.asarray(unpadded)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [width, valid])
    # A used slot prefilled from position 0 starts over, as a KV row is overwritten from 0.
    again, _ = model.runner.compiled().forward(model.runner.params, jnp.asarray(tokens), positions, cache)
    np.testing.assert_allclose(np.asarray(again), np.asarray(logits), atol=LOGITS_TOLERANCE, rtol=0)


def test_untied_mamba_with_biases_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4,
                                      conv_kernel=3, expand=2, use_bias=True, use_conv_bias=False,
                                      tie_word_embeddings=False, time_step_rank=5)
    reference = transformers.MambaForCausalLM._from_config(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.numpy()
    model = mrs.load(str(tmp_path), dtype="float32", device="cpu")
    assert model.config.time_step_rank == 5 and model.config.conv_kernel == 3
    np.testing.assert_allclose(model.logits(ids.numpy().astype(np.int32)), expected, atol=LOGITS_TOLERANCE, rtol=0)


def test_missing_tensors_and_bad_configs_are_typed_errors(fixture_path, tmp_path):
    folder = tmp_path / "mamba"
    shutil.copytree(fixture_path("mamba"), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["backbone.layers.1.mixer.A_log"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match="backbone.layers.1.mixer.A_log"):
        mrs.load(str(folder), dtype="float32", device="cpu")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        MambaConfig.from_hf({k: v for k, v in config.items() if k != "hidden_size"})
    with pytest.raises(UnsupportedModelError, match="conv_kernel"):
        MambaConfig.from_hf({**config, "conv_kernel": 1})
    with pytest.raises(UnsupportedModelError, match="activation 'bogus'"):
        MambaConfig.from_hf({**config, "hidden_act": "bogus"})


def test_cache_is_an_ssm_cache_whatever_max_len(mamba):
    model, _ = mamba
    cache = model.init_cache(3, 100)
    assert isinstance(cache, SSMCache) and cache.lengths.shape == (3,)
    assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(cache))


def test_old_backbone_embedding_name_loads_through_the_rename_hook(fixture_path, tmp_path):
    """Early Mamba checkpoints say ``backbone.embedding``; transformers renames it on load."""
    from mrs.families import mamba
    from mrs.weights import load_params

    tensors = load_file(fixture_path("mamba") / "model.safetensors")
    old = {name.replace("backbone.embeddings.", "backbone.embedding."): value for name, value in tensors.items()}
    save_file(old, tmp_path / "model.safetensors")
    arrays = load_params(tmp_path, tensors, np.float32, rename=mamba.rename, ignore=mamba.ignored)
    np.testing.assert_array_equal(arrays["backbone.embeddings.weight"], tensors["backbone.embeddings.weight"])
