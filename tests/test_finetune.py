"""Fine-tuning behaviour (torch-free, so the newest-jax stage runs it too): training teaches
a fixture a reply, dense and on a 4-bit base; the step compiles once per batch width;
resume, accumulation, remat and dropout do what they say; the CLI writes the adapter, its
log, its plot and a checkpoint; bad settings and data are refused clearly (adapter folders:
tests/test_adapters.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import mrs
import mrs.train
from mrs import adapters
from mrs.adapters import AdapterError, LoraSettings
from mrs.archs.quantized import QuantLinear
from mrs.cli import main
from mrs.errors import InvalidParameterError, MrsError
from mrs.train import LoraModel, Trainer, TrainOptions
from mrs.train.data import Batches, batch_arrays, read_examples

PROMPT, REPLY = "the cat sat on", " a purple hat today"


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def reply_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "reply.jsonl", [{"prompt": PROMPT, "completion": REPLY}] * 8)


def greedy(lora: LoraModel, params, ids: list[int], count: int, width: int = 32) -> list[int]:
    """Greedy tokens from the LoRA module itself: the whole sequence recomputed each step,
    padded to one width so it compiles once."""
    forward = jax.jit(lora.logits)
    out = list(ids)
    for _ in range(count):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(out)] = out
        positions = np.where(np.arange(width) < len(out), np.arange(width), -1).astype(np.int32)[None]
        logits = forward(params, lora.frozen, tokens, positions, lora.empty_cache(1))
        out.append(int(np.argmax(np.asarray(logits)[0, len(out) - 1])))
    return out[len(ids):]


def test_training_teaches_a_fixed_reply_that_the_adapter_then_generates(llama, reply_data, tmp_path):
    before = mrs.generate(llama, PROMPT, max_tokens=12, temperature=0).text
    assert not before.startswith(REPLY)
    result = mrs.train.lora(llama, reply_data, out=tmp_path / "out", steps=40, learning_rate=3e-3, batch_size=4,
                            rank=8, alpha=16, save_every=40)
    assert result.train_loss < 0.05 and result.compiles == 1
    tuned = mrs.load(str(llama.path), adapter=tmp_path / "out")
    assert mrs.generate(tuned, PROMPT, max_tokens=12, temperature=0).text.startswith(REPLY)
    assert mrs.generate(llama, PROMPT, max_tokens=12, temperature=0).text == before   # base untouched


def test_qlora_teaches_the_reply_on_an_int4_base_that_stays_quantized(fixture_path, reply_data):
    base = mrs.load(str(fixture_path("llama")), quantize="int4")
    result = mrs.train.lora(base, reply_data, steps=60, learning_rate=3e-3, batch_size=4, rank=8, alpha=16)
    lora = result.lora
    wrapped = lora.layers()
    assert wrapped and all(isinstance(m.base, QuantLinear) for m in wrapped)
    codes = [x for x in jax.tree_util.tree_leaves(lora.frozen) if x.dtype == np.uint32]
    assert len(codes) >= len(wrapped)                        # the frozen base is packed 4-bit codes
    tok = base.tokenizer
    want = tok.encode(REPLY, add_special_tokens=False)
    assert greedy(lora, result.trainer.params, tok.encode(PROMPT), len(want)) == want


def test_the_train_step_compiles_once_per_batch_width(llama, tmp_path):
    rows = [{"text": "a b"}, {"text": " ".join(["word"] * 40)}] * 4         # two widths
    examples = read_examples(write_jsonl(tmp_path / "mixed.jsonl", rows), llama.tokenizer, 128)
    trainer = Trainer(LoraModel(llama, LoraSettings(rank=2)), TrainOptions(steps=10, batch_size=2))
    widths = set()
    stream = Batches(examples, 2, 128, seed=1)
    for _ in range(12):
        batch = next(stream)
        widths.add(batch.tokens.shape[1])
        loss, norm = trainer.step(batch_arrays(batch, False))
        assert np.isfinite(loss) and np.isfinite(norm)
    assert len(widths) == 2 and trainer.compiles == 2


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f" answer {i}"} for i in range(6)])
    options = {"steps": 6, "learning_rate": 1e-2, "batch_size": 2, "save_every": 3, "rank": 2}
    whole = mrs.train.lora(llama, data, out=tmp_path / "whole", **options)

    class Stop(Exception):
        pass

    def stop_after_the_checkpoint(progress):
        if progress.step == 4:
            raise Stop
    settings = LoraSettings(rank=2, alpha=16.0, base_model=llama.name)
    train_options = TrainOptions(**{k: v for k, v in options.items() if k != "rank"})
    with pytest.raises(Stop):
        mrs.train.finetune(llama, data, out=tmp_path / "cut", settings=settings, options=train_options,
                           on_progress=stop_after_the_checkpoint)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed = mrs.train.finetune(llama, data, out=tmp_path / "cut", settings=settings, options=train_options)
    assert [e["step"] for e in resumed.history] == [1, 2, 3, 4, 5, 6]
    saved = adapters.read(tmp_path / "cut").weights               # the result holds the trained factors
    for module, (a, b) in resumed.lora.adapter().weights.items():
        np.testing.assert_array_equal(a, saved[module][0])
        np.testing.assert_array_equal(b, saved[module][1])
    assert [e["loss"] for e in resumed.history] == pytest.approx([e["loss"] for e in whole.history], abs=1e-6)
    ours, theirs = adapters.read(tmp_path / "cut").weights, adapters.read(tmp_path / "whole").weights
    for module, (a, b) in theirs.items():
        np.testing.assert_allclose(ours[module][0], a, atol=1e-6)
        np.testing.assert_allclose(ours[module][1], b, atol=1e-6)
    with pytest.raises(MrsError, match="another run"):      # same folder, other options: refused
        mrs.train.finetune(llama, data, out=tmp_path / "cut", settings=settings,
                           options=TrainOptions(**{**train_options.__dict__, "steps": 7}))
    with pytest.raises(MrsError, match="resume it"):
        mrs.train.finetune(llama, data, out=tmp_path / "cut", settings=settings, options=train_options, resume=False)
    data.write_text(data.read_text().replace("answer 5", "answer 6"))     # same lines, other data
    with pytest.raises(MrsError, match="another run"):
        mrs.train.finetune(llama, data, out=tmp_path / "cut", settings=settings, options=train_options)


def test_a_crash_mid_save_resumes_from_the_previous_checkpoint_and_foreign_folders_are_refused(llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"line {i} of text"} for i in range(4)])
    options = {"steps": 2, "batch_size": 2, "save_every": 1, "rank": 2}
    done = mrs.train.lora(llama, data, out=tmp_path / "run", **options)
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / ".checkpoint.old")    # as a crash would leave
    again = mrs.train.lora(llama, data, out=tmp_path / "run", **options)
    assert again.history == done.history and again.train_loss == done.train_loss      # nothing left to train
    foreign = tmp_path / "foreign"
    adapters.write(foreign, adapters.read(tmp_path / "run"))
    with pytest.raises(MrsError, match="already holds an adapter"):
        mrs.train.lora(llama, data, out=foreign, **options)


def micro_batch(seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 300, (2, 32)).astype(np.int32)
    return {"tokens": tokens, "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1)),
            "targets": np.roll(tokens, -1, axis=1), "weights": np.ones((2, 32), np.float32)}


def test_accumulation_updates_once_per_k_micro_batches(llama):
    trainer = Trainer(LoraModel(llama, LoraSettings(rank=2)), TrainOptions(steps=4, accumulate=2, warmup=0))

    def b_factor():      # a B (zero at init, so its first update cannot be zero)
        return np.asarray(trainer.params["model"]["layers"][0]["mlp"]["down_proj"]["lora_b"][0]).copy()
    start = b_factor()
    trainer.step(micro_batch(0))
    np.testing.assert_array_equal(b_factor(), start)
    trainer.step(micro_batch(1))
    assert np.abs(b_factor() - start).max() > 0


def test_remat_changes_memory_not_the_gradients(llama):
    plain, remat = LoraModel(llama, LoraSettings(rank=2)), LoraModel(llama, LoraSettings(rank=2), remat=True)
    batch = micro_batch(2)
    temporaries = []

    def grads(lora):     # at the same factors, B non-zero too (the wrapped layers' paths differ)
        params = jax.tree_util.tree_map(lambda x: x + 0.01, lora.params)
        step = jax.jit(jax.grad(lambda p: lora.loss(p, lora.frozen, batch, lora.empty_cache(2))[0]))
        temporaries.append(step.lower(params).compile().memory_analysis().temp_size_in_bytes)
        return step(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads(plain)), jax.tree_util.tree_leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert temporaries[1] < temporaries[0]           # activations recomputed, not kept


def test_dropout_draws_a_mask_per_step_and_is_off_without_a_key(llama):
    drop, plain = LoraModel(llama, LoraSettings(rank=2, dropout=0.5)), LoraModel(llama, LoraSettings(rank=2))
    params = jax.tree_util.tree_map(lambda x: x + 0.05, drop.params)
    batch = micro_batch(3)

    def loss(lora, key):
        return float(jax.jit(lambda key: lora.loss(params, lora.frozen, batch, lora.empty_cache(2), key)[0])(key))
    one, two = loss(drop, jax.random.key(1)), loss(drop, jax.random.key(2))
    assert one != two and loss(drop, jax.random.key(1)) == one
    assert loss(drop, None) == pytest.approx(loss(plain, None), abs=1e-6)
    layer = drop.layers()[0]        # a fused q/k/v: each checkpoint module draws its own mask
    h = np.ones((4, 64), np.float32)
    masks = [np.asarray(layer._dropped(h, jax.random.key(1), piece)) for piece in range(3)]
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_the_cli_writes_adapter_log_plot_and_checkpoint_then_generates_with_it(fixture_path, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                               {"role": "assistant", "content": f"hello {i}"}]}
                                                 for i in range(8)])
    out = tmp_path / "adapter"
    model = str(fixture_path("llama"))
    assert main(["finetune", model, str(data), "--out", str(out), "--steps", "4", "--eval-every", "2",
                 "--val-fraction", "0.25", "--rank", "4", "--targets", "q_proj,v_proj"]) == 0
    said = capsys.readouterr()
    count = sum(a.size + b.size for a, b in adapters.read(out).weights.values())
    assert f"trained {count:,} LoRA parameters for 4 updates" in said.out and "validation loss" in said.out
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss.png",
            "checkpoint"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and [("val_loss" in e) for e in log] == [False, True, False, True]
    assert sorted(adapters.read(out).settings.targets) == ["q_proj", "v_proj"]
    assert main(["generate", "--model", model, "--adapter", str(out), "hi", "--temperature", "0",
                 "--max-tokens", "4", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] == 4


def test_the_cli_names_a_bad_data_line(fixture_path, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "p", "completion": 3}\n')
    assert main(["finetune", str(fixture_path("llama")), str(data), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl line 2" in err and "completion" in err
    assert main(["finetune", str(fixture_path("llama")), str(data)]) == 1
    assert "--out is required" in capsys.readouterr().err


def test_settings_and_options_out_of_range_are_refused(llama):
    for bad in ({"rank": 0}, {"alpha": -1}, {"dropout": 1.0}, {"rank": 2.5}):
        with pytest.raises(AdapterError):
            LoraSettings(**bad)
    for bad in ({"steps": 0}, {"learning_rate": 0}, {"batch_size": -1}, {"max_length": 1}, {"warmup": -2}):
        with pytest.raises(InvalidParameterError):
            TrainOptions(**bad)
    with pytest.raises(AdapterError, match="its modules are: down_proj, gate_proj, k_proj"):
        LoraModel(llama, LoraSettings(targets=("query",)))


def test_a_packed_row_runs_as_one_sequence():
    positions = np.array([[0, 1, 2, 0, 1, -1, -1]], np.int32)
    batch = type("B", (), {"positions": positions, "tokens": positions, "targets": positions,
                           "weights": positions.astype(np.float32)})
    np.testing.assert_array_equal(batch_arrays(batch, True)["positions"], [[0, 1, 2, 3, 4, -1, -1]])
    np.testing.assert_array_equal(batch_arrays(batch, False)["positions"], positions)


def test_qlora_gradients_equal_those_on_the_dequantized_twin(fixture_path, tmp_path):
    """The 4-bit base is a constant the gradient passes through exactly: LoRA's gradients on
    it equal those on a dense model holding the same dequantized values, in every layer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_quantized_models import at_load_twin

    settings = LoraSettings(rank=2)
    packed = LoraModel(mrs.load(str(fixture_path("llama")), quantize="int4"), settings)
    twin = LoraModel(mrs.load(str(at_load_twin(fixture_path("llama"), tmp_path / "twin", 4))), settings)
    def grads(lora, batch):
        params = jax.tree_util.tree_map(lambda x: x + 0.02, lora.params)
        cache = lora.empty_cache(batch["tokens"].shape[0])
        return jax.jit(jax.grad(lambda p: lora.loss(p, lora.frozen, batch, cache)[0]))(params)
    for rows in (1, 2):        # one row x 8 tokens runs the C++ kernel, 2 x 32 the dense path
        batch = {k: v[:rows, : 8 if rows == 1 else 32] for k, v in micro_batch(4).items()}
        ours, theirs = jax.tree_util.tree_leaves(grads(packed, batch)), jax.tree_util.tree_leaves(grads(twin, batch))
        assert len(ours) == len(theirs) and max(float(np.abs(np.asarray(g)).max()) for g in theirs) > 1e-2
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)
