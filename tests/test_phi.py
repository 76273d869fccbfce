"""Phi-1/1.5/2 and Phi-3 parity with transformers: logits (Phi-3 below and above
original_max_position_embeddings, i.e. with its short and its long rope factors),
greedy tokens alone and in a mixed-length batch, no recompiles, both config dialects."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mrs
from mrs.archs.phi import PhiConfig
from mrs.errors import UnsupportedModelError

PHI_FAMILY = ["phi", "phi3"]
LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def loaded(fixture_path):
    cache: dict[str, tuple[mrs.Model, dict]] = {}

    def get(name: str):
        if name not in cache:
            path = fixture_path(name)
            cache[name] = (mrs.load(str(path), dtype="float32", device="cpu"), dict(np.load(path / "golden.npz")))
        return cache[name]

    return get


@pytest.mark.parametrize("name", PHI_FAMILY)
def test_logits_match_transformers(loaded, name):
    model, golden = loaded(name)
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)


def test_phi3_prompt_longer_than_original_context_uses_long_rope_factors_like_transformers(loaded):
    model, golden = loaded("phi3")
    original = model.config.rope.original_max_position
    assert golden["logits_ids"].shape[1] <= original < golden["long_logits_ids"].shape[1]
    np.testing.assert_allclose(model.logits(golden["long_logits_ids"]), golden["long_logits"],
                               atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", PHI_FAMILY)
def test_greedy_tokens_match_transformers_alone_and_in_a_mixed_length_batch(loaded, name):
    model, golden = loaded(name)
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    alone = mrs.generate(model, prompts[2], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert alone.token_ids == golden["greedy_2"].tolist()
    batch = mrs.generate_batch(model, prompts, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, completion in enumerate(batch):
        assert completion.token_ids == golden[f"greedy_{i}"].tolist(), f"row {i} differs from its batch-1 run"


@pytest.mark.parametrize("name", PHI_FAMILY)
def test_new_prompts_of_warm_shapes_do_not_recompile(loaded, name):
    model, golden = loaded(name)
    prompts = [golden[f"prompt_{i}"][0].tolist() for i in range(3)]
    mrs.generate_batch(model, prompts, max_tokens=8, temperature=0, ignore_eos=True)
    warm = model.steps.compiled_count()
    mrs.generate_batch(model, [p[::-1] for p in prompts[::-1]], max_tokens=8, temperature=0.7, seed=1)
    mrs.generate_batch(model, [prompts[1][:5], prompts[0], prompts[2][1:] + prompts[2][:1]], max_tokens=8,
                       temperature=0)
    assert model.steps.compiled_count() == warm


def test_phi3_reads_both_config_dialects_and_the_old_su_spelling(fixture_path):
    v4 = json.loads((fixture_path("phi3") / "config.json").read_text())
    assert "rope_scaling" in v4 and "rope_parameters" not in v4
    v5 = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta", "partial_rotary_factor")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": v4["rope_theta"],
                             "partial_rotary_factor": v4["partial_rotary_factor"]}
    su = {**v4, "rope_scaling": {**{k: v for k, v in v4["rope_scaling"].items() if k != "rope_type"}, "type": "su"}}
    expected = PhiConfig.from_hf(v4)
    assert expected.rope.kind == "longrope" and expected.rope.rotary_dim == 12
    assert PhiConfig.from_hf(v5) == expected == PhiConfig.from_hf(su)


def test_phi_defaults_to_half_rotary_and_rejects_unknown_rope(fixture_path):
    config = json.loads((fixture_path("phi") / "config.json").read_text())
    config.pop("partial_rotary_factor", None)
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(config.get(key), dict):
            config[key] = {k: v for k, v in config[key].items() if k != "partial_rotary_factor"}
    assert PhiConfig.from_hf(config).rope.rotary_dim == config["hidden_size"] // config["num_attention_heads"] // 2
    with pytest.raises(UnsupportedModelError, match="rope type"):
        PhiConfig.from_hf({**config, "rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModelError, match="lacks required key 'hidden_size'"):
        PhiConfig.from_hf({k: v for k, v in config.items() if k != "hidden_size"})


VARIANTS = {
    "phi: qk_layernorm, GQA, tied head (bias kept)": (
        "PhiConfig", "PhiForCausalLM",
        {"num_key_value_heads": 2, "qk_layernorm": True, "tie_word_embeddings": True}),
    "phi3: sliding window 8, tied head, default rope, partial 0.5": (
        "Phi3Config", "Phi3ForCausalLM",
        {"num_key_value_heads": 4, "sliding_window": 8, "tie_word_embeddings": True, "pad_token_id": 0,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_without_fixtures_match_transformers(variant, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=128, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, eos_token_id=2,
                                               **extra)
    reference = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim >= 2 else 1.0))
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.numpy()
    model = mrs.load(str(tmp_path), dtype="float32", device="cpu")
    np.testing.assert_allclose(model.logits(ids.numpy().astype(np.int32)), expected, atol=LOGITS_TOLERANCE, rtol=0)
