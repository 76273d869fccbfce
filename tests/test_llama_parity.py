"""Llama-family and Gemma parity with transformers: logits and greedy tokens, from golden
files that scripts/make_fixtures.py records with transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import mrs

LLAMA_FAMILY = ["llama", "llama3", "llama-linear", "llama-dynamic", "mistral", "granite", "qwen2", "qwen3",
                "llama-sharded", "gemma", "gemma2", "gemma3"]
LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def loaded(fixture_path):
    cache: dict[str, tuple[mrs.Model, dict]] = {}

    def get(name: str):
        if name not in cache:
            path = fixture_path(name)
            golden = dict(np.load(path / "golden.npz"))
            cache[name] = (mrs.load(str(path)), golden)
        return cache[name]

    return get


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_logits_match_transformers(loaded, name):
    model, golden = loaded(name)
    ours = model.logits(golden["logits_ids"])
    assert ours.shape == golden["logits"].shape
    np.testing.assert_allclose(ours, golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_greedy_tokens_match_transformers_at_batch_1_and_batch_3(loaded, name):
    model, golden = loaded(name)
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    # llama-dynamic's context (32 positions x factor 2) is shorter than 17 + 64 tokens:
    # each row is compared over what fits, which still runs well past position 32.
    expected = [golden[f"greedy_{i}"].tolist()[:model.context_length - len(p)] for i, p in enumerate(prompts)]
    alone = mrs.generate(model, prompts[1], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert alone.token_ids == expected[1]
    assert alone.finish_reason == "length"
    batch = mrs.generate_batch(model, prompts, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, completion in enumerate(batch):
        assert completion.token_ids == expected[i], f"row {i} differs from its batch-1 run"


def test_both_config_dialects_are_read(fixture_path):
    import json

    v5 = json.loads((fixture_path("llama") / "config.json").read_text())
    v4 = json.loads((fixture_path("llama3") / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert "rope_scaling" in v4 and "rope_theta" in v4 and "rope_parameters" not in v4


def test_gemma3_reads_both_config_dialects_alike(fixture_path):
    """Per-layer-type rope_parameters (transformers 5) and rope_theta + rope_local_base_freq +
    rope_scaling (4.x) describe the same model."""
    import json

    from mrs.families.gemma import GemmaConfig

    v5 = json.loads((fixture_path("gemma3") / "config.json").read_text())
    full, local = v5["rope_parameters"]["full_attention"], v5["rope_parameters"]["sliding_attention"]
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"],
              rope_scaling={"rope_type": full["rope_type"], "factor": full["factor"]})
    a, b = GemmaConfig.from_hf(v5), GemmaConfig.from_hf(v4)
    assert a == b and a.rope != a.local_rope and a.rope.kind == "linear" and a.local_rope.theta == local["rope_theta"]
    assert a.sliding_windows == (16, None, 16)
