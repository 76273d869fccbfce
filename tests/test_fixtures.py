"""The transformers-built fixtures are what the parity tests assume they are."""

import json

import numpy as np
import pytest
from conftest import make_fixtures as mf

DECODER_KEYS = {"logits_ids", "logits", "margin_min"} | {
    f"{kind}_{i}" for kind in ("prompt", "greedy") for i in range(3)
}
BERT_KEYS = {"input_ids", "attention_mask", "last_hidden_state", "embeddings"}


def load_golden(folder):
    with np.load(folder / "golden.npz") as z:
        return dict(z)


def test_stamp_matches_the_script(fixtures_dir):
    pytest.importorskip("torch")            # the stamp names the oracle's versions
    assert json.loads((fixtures_dir / mf.STAMP_FILE).read_text()) == mf.stamp()


def test_decoder_golden_has_the_documented_keys_shapes_and_dtypes(decoder_name, fixture_path):
    g = load_golden(fixture_path(decoder_name))
    long = mf.SPECS[decoder_name].long_logits_len
    assert set(g) == DECODER_KEYS | ({"long_logits_ids", "long_logits"} if long else set())
    for prefix in ["", "long_"] if long else [""]:
        ids, logits = g[f"{prefix}logits_ids"], g[f"{prefix}logits"]
        assert ids.dtype == np.int32 and ids.shape[0] == 1 and ids[0, 0] == mf.BOS
        assert logits.dtype == np.float32 and logits.shape == (*ids.shape, mf.VOCAB)
    for i, n in enumerate(mf.PROMPT_LENS):
        prompt, tokens = g[f"prompt_{i}"], g[f"greedy_{i}"]
        assert prompt.dtype == np.int32 and prompt.shape == (1, n) and prompt[0, 0] == mf.BOS
        assert tokens.dtype == np.int32 and tokens.shape == (mf.GREEDY_STEPS,)
    assert g["margin_min"].shape == () and g["margin_min"] > 1e-3


def test_phi3_and_dynamic_goldens_cross_the_original_context(fixture_path):
    assert load_golden(fixture_path("llama-dynamic"))["logits_ids"].shape[1] > 32
    phi3 = load_golden(fixture_path("phi3"))
    assert phi3["logits_ids"].shape[1] < 32 < phi3["long_logits_ids"].shape[1]


def test_decoder_folder_loads_in_transformers_and_reproduces_its_logits(decoder_name, fixture_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = fixture_path(decoder_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(model).__name__ == mf.SPECS[decoder_name].model_cls
    g = load_golden(folder)
    with torch.no_grad():
        logits = model(torch.from_numpy(g["logits_ids"]).long()).logits.numpy()
    np.testing.assert_allclose(logits, g["logits"], atol=1e-5, rtol=0)


def test_configs_use_the_dialects_the_parity_tests_rely_on(fixture_path):
    def config(name):
        return json.loads((fixture_path(name) / "config.json").read_text())

    assert config("llama")["rope_parameters"]["rope_type"] == "default"  # transformers 5
    llama3 = config("llama3")  # transformers 4.x / Hub dialect
    assert "rope_parameters" not in llama3 and llama3["rope_theta"] == 500000.0
    assert llama3["rope_scaling"]["rope_type"] == "llama3"
    assert config("llama-linear")["rope_scaling"] == {"type": "linear", "factor": 2.0}
    phi3 = config("phi3")
    assert phi3["rope_scaling"]["type"] == "longrope" and phi3["partial_rotary_factor"] == 0.75
    assert config("phi")["rope_parameters"]["partial_rotary_factor"] == 0.5


def test_generation_config_eos_is_a_list_for_llama_and_an_int_elsewhere(fixture_path):
    def eos(name):
        return json.loads((fixture_path(name) / "generation_config.json").read_text())[
            "eos_token_id"
        ]

    assert eos("llama") == [mf.IM_END, mf.EOS]
    assert eos("mistral") == mf.EOS


def test_llama_sharded_has_several_shards_and_an_index(fixture_path):
    folder = fixture_path("llama-sharded")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards


def test_bpe_tokenizer_adds_bos_and_renders_chat_with_role_checks(fixture_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(fixture_path("llama"))
    assert len(tok) <= mf.VOCAB
    ids = tok.encode("héllo wörld 日本語 🙂")
    assert ids[0] == mf.BOS and tok.decode(ids[1:]) == "héllo wörld 日本語 🙂"
    chat = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(chat * 2, tokenize=False)


def test_bert_golden_matches_sentence_transformers(fixture_path):
    folder = fixture_path("bert")
    g = load_golden(folder)
    assert set(g) == BERT_KEYS
    texts = json.loads((folder / "texts.json").read_text())
    lengths = g["attention_mask"].sum(1)
    assert g["input_ids"].shape == g["attention_mask"].shape == (len(texts), lengths.max())
    assert len(set(lengths.tolist())) == len(texts)  # a genuinely padded batch
    np.testing.assert_allclose(np.linalg.norm(g["embeddings"], axis=1), 1.0, atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(model.encode(texts), g["embeddings"], atol=1e-5)
