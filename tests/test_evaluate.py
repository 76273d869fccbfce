"""Perplexity (llama.cpp's method: independent windows, second halves scored) against the
same windows scored by transformers on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mrs
from mrs.cli import main
from mrs.errors import InvalidParameterError, MrsError

TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "def main():\n    return 42\n" * 4
        + "Tokyo, Paris and Lagos are large cities. " * 5)


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


def test_perplexity_equals_transformers_scoring_the_same_windows(llama, fixture_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(fixture_path("llama"), dtype=torch.float32).eval()
    context = 32
    result = mrs.perplexity(llama, TEXT, context=context)
    ids = llama.tokenizer.encode(TEXT)
    windows = len(ids) // context
    assert result.windows == windows >= 3 and result.tokens == windows * (context - context // 2 - 1)
    chunks = torch.tensor(ids[:windows * context]).reshape(windows, context)
    bos = llama.tokenizer.token_id(llama.tokenizer.bos_token)
    if ids[0] == bos:             # llama.cpp starts every window with BOS when the tokenizer adds one
        chunks[:, 0] = bos
    with torch.no_grad():
        logp = torch.log_softmax(reference(chunks).logits.double(), dim=-1)
    first = context // 2
    nll = -logp[:, first:-1].gather(-1, chunks[:, first + 1:, None])[..., 0]
    assert result.perplexity == pytest.approx(float(torch.exp(nll.mean())), rel=1e-5)


def test_perplexity_refuses_what_it_cannot_score(llama, fixture_path):
    with pytest.raises(InvalidParameterError, match="window"):
        mrs.perplexity(llama, "too short", context=64)
    with pytest.raises(InvalidParameterError, match="context"):
        mrs.perplexity(llama, TEXT, context=2)
    with pytest.raises(MrsError, match="encoder"):
        mrs.perplexity(mrs.load(str(fixture_path("bert"))), TEXT)


def test_mrs_perplexity_prints_the_result(llama, fixture_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["perplexity", str(fixture_path("llama")), str(text), "--context", "32", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["windows"] >= 3 and np.isfinite(out["perplexity"]) and out["perplexity"] > 1
    assert main(["perplexity", str(fixture_path("llama")), str(tmp_path / "missing.txt")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.txt" in err, err
