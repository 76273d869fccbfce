"""Mamba-1 on MLX: the chunked closed-form scan (mrs/mlx/scan.py) against the step-by-step
recurrence, the mamba fixture against transformers and the JAX backend (logits, 64
greedy tokens alone and in a mixed-length batch), padding and fresh-slot state
semantics of the SSM cache, and the untied-with-biases variant."""

from __future__ import annotations

import numpy as np
import pytest

import mrs
from mrs.engine.generate import RunResult, run

mx = pytest.importorskip("mlx.core")

from mrs.mlx.cache import SSMCache  # noqa: E402
from mrs.mlx.scan import CHUNK, selective_scan, selective_step  # noqa: E402

LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 64


# --- the scan against its definition ------------------------------------------------

def _recurrence(x, dt, A, B, C, D, z, h0):
    """The definition in float64 numpy, one step at a time."""
    h, ys = h0.astype(np.float64), []
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h, C[:, t]) + D * x[:, t])
    y = np.stack(ys, axis=1)
    return y * z / (1 + np.exp(-z)), h


def _scan_inputs(batch, steps, inner=12, state=4, seed=0, log_dt=None):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)
    dt = np.log1p(np.exp(f(batch, steps, inner) - 1.0)) if log_dt is None else \
        np.exp(rng.uniform(*log_dt, (batch, steps, inner)))
    dt = dt.astype(np.float32)
    dt[0, max(steps - 3, 1):] = 0.0                                       # row 0 ends in padding (dt = 0)
    return [f(batch, steps, inner), dt, -np.exp(f(inner, state)), f(batch, steps, state), f(batch, steps, state),
            f(inner), f(batch, steps, inner), f(batch, inner, state)]


def _mlx_scan(args, **kw):
    y, h = selective_scan(*(mx.array(a) for a in args), **kw)
    return np.array(y), np.array(h)


@pytest.mark.parametrize("steps", [1, 5, 17, 64])
@pytest.mark.parametrize("chunk", [CHUNK, 8])
def test_chunked_scan_matches_the_step_by_step_definition(steps, chunk):
    args = _scan_inputs(3, steps)
    y_ref, h_ref = _recurrence(*args)
    y, h = _mlx_scan(args, chunk=chunk)
    assert y.dtype == np.float32 and h.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    if steps > 3:   # padding steps (dt = 0) leave the state where the last valid step put it
        _, h_valid = _recurrence(*(a[:, :steps - 3] if a.ndim == 3 and a.shape[1] == steps else a for a in args))
        np.testing.assert_allclose(h[0], h_valid[0], atol=1e-5, rtol=1e-5)


def test_a_decode_step_is_one_recurrence_update():
    args = _scan_inputs(2, 1)
    y_ref, h_ref = _recurrence(*args)
    x, dt, A, B, C, D, z, h0 = (mx.array(a) for a in args)
    y, h = selective_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], h0)
    np.testing.assert_allclose(np.array(y), y_ref[:, 0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(h), h_ref, atol=1e-5, rtol=1e-5)


def test_steep_decays_stay_finite_and_exact():
    """dt A down to about -700 over a chunk: decays underflow to 0, nothing overflows."""
    args = _scan_inputs(2, 37, log_dt=(-6.0, 3.0), seed=1)
    args[2] = -np.exp(np.random.default_rng(2).uniform(-2, 4, args[2].shape)).astype(np.float32)
    y_ref, h_ref = _recurrence(*args)
    y, h = _mlx_scan(args)
    assert np.isfinite(y).all() and np.isfinite(h).all()
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * np.abs(y_ref).max(), rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5 * np.abs(h_ref).max(), rtol=1e-5)


# --- the model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mamba(fixture_path):
    path = fixture_path("mamba")
    return mrs.load(str(path), dtype="float32", device="mlx"), dict(np.load(path / "golden.npz"))


@pytest.fixture(scope="module")
def jax_mamba(fixture_path):
    return mrs.load(str(fixture_path("mamba")), dtype="float32", device="cpu")


def test_params_are_the_jax_models_names_and_shapes(mamba, jax_mamba):
    model, _ = mamba
    assert model.runner.backend == "mlx"
    assert {k: v.shape for k, v in model.runner.spec.items()} == {k: v.shape for k, v in jax_mamba.runner.spec.items()}


def test_logits_match_transformers_and_the_jax_backend(mamba, jax_mamba):
    model, golden = mamba
    ours = model.logits(golden["logits_ids"])
    np.testing.assert_allclose(ours, golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours, jax_mamba.logits(golden["logits_ids"]), atol=LOGITS_TOLERANCE, rtol=0)


def test_greedy_tokens_match_transformers_alone_and_in_a_mixed_length_batch(mamba):
    model, golden = mamba
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    assert len({len(p) for p in prompts}) > 1, "the batch mixes prompt lengths"
    alone = mrs.generate(model, prompts[2], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert alone.token_ids == golden["greedy_2"].tolist()
    batch = mrs.generate_batch(model, prompts, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, completion in enumerate(batch):
        assert completion.token_ids == golden[f"greedy_{i}"].tolist(), f"row {i} differs from transformers"


def test_state_size_is_constant_and_a_long_run_keeps_its_shapes(mamba):
    model, golden = mamba
    nbytes = [sum(a.nbytes for a in model.init_cache(1, n).arrays()) for n in (256, 1 << 16)]
    assert nbytes[0] == nbytes[1]
    prompt = golden["prompt_0"][0].tolist()
    result = next(e for e in run(model, [prompt], max_tokens=256, temperature=0, ignore_eos=True)
                  if isinstance(e, RunResult))
    completion = result.completions[0]
    assert completion.completion_tokens == 256 and completion.finish_reason == "length"
    assert completion.token_ids[:NEW_TOKENS] == golden["greedy_0"].tolist()
    assert isinstance(result.cache, SSMCache)
    assert [a.shape for a in result.cache.arrays()] == [a.shape for a in model.init_cache(1, 16).arrays()]
    assert int(result.cache.lengths[0]) == len(prompt) + 255      # the last sampled token is never fed


def test_padded_prefill_leaves_the_same_state_as_an_unpadded_one_and_slots_restart_at_position_0(mamba):
    model, golden = mamba
    net, runner = model.runner.model, model.runner
    ids = golden["logits_ids"][0]
    width, valid = 20, 5                                     # ids[width] is the next token of row 0
    tokens = np.stack([ids[:width], np.r_[ids[:valid], np.zeros(width - valid, ids.dtype)]]).astype(np.int32)
    positions = np.stack([np.arange(width), np.where(np.arange(width) < valid, np.arange(width), -1)]).astype(np.int32)
    cache = runner.new_cache(2, width + 2)
    logits, cache = net(mx.array(tokens), positions, cache)
    logits = np.array(logits)
    state = [np.array(a) for a in cache.arrays()]
    alone, alone_cache = net(mx.array(tokens[1:2, :valid]), positions[1:2, :valid], runner.new_cache(1, width))
    np.testing.assert_allclose(logits[1, :valid], np.array(alone)[0], atol=LOGITS_TOLERANCE, rtol=0)
    for padded, unpadded in zip(state, alone_cache.arrays(), strict=True):
        np.testing.assert_allclose(padded[1], np.array(unpadded)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [width, valid])
    # The next token continues each row from its own last valid step.
    step = np.array([[int(ids[width])], [int(ids[valid])]], np.int32)
    next_logits, cache = net(mx.array(step), np.array([[width], [valid]], np.int32), cache)
    alone_next, _ = net(mx.array(step[1:]), np.array([[valid]], np.int32), alone_cache)
    np.testing.assert_allclose(np.array(next_logits)[1], np.array(alone_next)[0], atol=LOGITS_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [width + 1, valid + 1])
    # A used slot prefilled from position 0 starts over, as a KV row is overwritten from 0.
    again, cache = net(mx.array(tokens), positions, cache)
    np.testing.assert_allclose(np.array(again), logits, atol=LOGITS_TOLERANCE, rtol=0)
    # ... and only the row that restarts: the other continues from its state.
    mixed_pos = np.array([[width + 1], [0]], np.int32)
    mixed, _ = net(mx.array(step), mixed_pos, cache)
    restarted, _ = net(mx.array(step[1:]), np.array([[0]], np.int32), runner.new_cache(1, width))
    np.testing.assert_allclose(np.array(mixed)[1], np.array(restarted)[0], atol=LOGITS_TOLERANCE, rtol=0)


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
    model = mrs.load(str(tmp_path), dtype="float32", device="mlx")
    assert model.runner.backend == "mlx"
    assert model.config.time_step_rank == 5 and model.config.conv_kernel == 3
    assert "lm_head.weight" in model.runner.spec and "backbone.layers.0.mixer.in_proj.bias" in model.runner.spec
    np.testing.assert_allclose(model.logits(ids.numpy().astype(np.int32)), expected, atol=LOGITS_TOLERANCE, rtol=0)
