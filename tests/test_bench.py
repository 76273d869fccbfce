"""scripts/bench.py end to end on a fixture: both frameworks, the ratios and the bounds."""

from __future__ import annotations

import functools
import json
import statistics

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_bench_times_mrs_and_transformers_on_the_same_weights(bench, fixture_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    # Bandwidth on 4 MiB instead of 1 GiB: the test checks the report, not the machine.
    monkeypatch.setattr(bench, "copy_bandwidth", functools.partial(bench.copy_bandwidth, nbytes=2**22))
    monkeypatch.setattr(bench, "read_bandwidth", functools.partial(bench.read_bandwidth, nbytes=2**22))
    out = tmp_path / "report.json"
    bench.main(["--model", str(fixture_path("llama")), "--batch", "1", "2", "--prompt-len", "8",
                "--new-tokens", "6", "--repeats", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["read_bandwidth"]["gbps"] > 0 and report["bandwidth"]["gbps"] > 0
    for batch in ("1", "2"):
        ours = report["mrs"]["by_batch"][batch]
        assert ours["compilations"]["timed"] == 0            # no timed run paid for compiling
        theirs = report["transformers"]["by_batch"][batch]
        assert len(ours["decode_seconds"]) == 2 and len(theirs["decode_seconds"]) == 2
    # The summary against the raw timings and an independent count of the weights' bytes:
    # decode times new_tokens - 1 steps (the first token comes from the prompt step).
    from safetensors.numpy import load_file

    tensors = load_file(fixture_path("llama") / "model.safetensors")
    assert report["mrs"]["param_bytes"] == sum(t.nbytes for t in tensors.values())   # tied: one matrix
    assert report["mrs"]["weight_bytes_per_step"] == report["mrs"]["param_bytes"]
    rows = {r["batch"]: r for r in report["summary"]}
    assert set(rows) == {1, 2}
    for batch, row in rows.items():
        mrs_tok_s = batch * 5 / statistics.median(report["mrs"]["by_batch"][str(batch)]["decode_seconds"])
        hf_tok_s = batch * 5 / statistics.median(report["transformers"]["by_batch"][str(batch)]["decode_seconds"])
        assert row["mrs_decode_tok_s"] == pytest.approx(mrs_tok_s) and row["hf_decode_tok_s"] == pytest.approx(hf_tok_s)
        assert row["decode_ratio"] == pytest.approx(mrs_tok_s / hf_tok_s)
        read_bound = batch * report["read_bandwidth"]["gbps"] * 1e9 / report["mrs"]["param_bytes"]
        assert row["mrs_pct_read"] == pytest.approx(100 * mrs_tok_s / read_bound)
        assert row["hf_pct_read"] == pytest.approx(100 * hf_tok_s / read_bound)
        assert row["greedy_agree_tokens"] == 6               # same weights, same greedy tokens
    printed = capsys.readouterr().out
    assert "read bandwidth" in printed and "decode streams the weights" in printed
