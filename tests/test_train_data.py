"""mrs.train.data: JSONL lines -> ids and loss masks -> bucketed, resumable, packed batches."""

import json

import numpy as np
import pytest

from mrs.tokenizer import Tokenizer
from mrs.train.data import (
    Batches,
    DataError,
    Example,
    batches_once,
    bucket_length,
    read_examples,
    split_validation,
)

BOS, EOS = 1, 2  # the fixture tokenizer's ids (scripts/make_fixtures.py)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye now."},
]


@pytest.fixture(scope="module")
def tok(fixture_path) -> Tokenizer:
    return Tokenizer(fixture_path("llama"))  # ChatML template that writes BOS itself


def write_jsonl(tmp_path, *lines) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def trained_runs(tok, example) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for i, t in zip(example.ids.tolist(), example.trained.tolist()):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def make(line, ids, trained=None) -> Example:
    ids = np.asarray(ids, np.int32)
    trained = np.ones(len(ids), bool) if trained is None else np.asarray(trained, bool)
    trained[0] = False
    return Example(ids, trained, line)


# --- formats ---------------------------------------------------------------------------


def test_messages_train_exactly_the_assistant_answers_and_their_end_of_turn(tok, tmp_path):
    [e] = read_examples(write_jsonl(tmp_path, {"messages": CHAT}), tok, 512)
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert e.ids.dtype == np.int32 and e.trained.dtype == bool and e.line == 1
    assert e.ids.tolist() == tok.encode(full, add_special_tokens=False)  # segments re-join losslessly here
    assert e.ids.tolist().count(BOS) == 1 and e.ids[0] == BOS  # BOS from the template, not twice
    assert trained_runs(tok, e) == ["Hello.<|im_end|>\n", "Bye now.<|im_end|>\n"]
    # The generation-prompt header before each answer is context, not target.
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    first = e.trained.tolist().index(True)
    assert e.ids[first - len(header):first].tolist() == header and not e.trained[:first].any()


def test_prompt_completion_trains_the_completion_and_eos(tok, tmp_path):
    [e] = read_examples(write_jsonl(tmp_path, {"prompt": "The quick brown", "completion": " fox jumps"}), tok, 512)
    prompt, completion = tok.encode("The quick brown"), tok.encode(" fox jumps", add_special_tokens=False)
    assert prompt[0] == BOS
    assert e.ids.tolist() == prompt + completion + [EOS]
    assert e.trained.tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)


def test_text_trains_every_token_after_the_first(tok, tmp_path):
    [e] = read_examples(write_jsonl(tmp_path, {"text": "The lazy dog."}), tok, 512)
    assert e.ids.tolist() == tok.encode("The lazy dog.") + [EOS]
    assert e.trained.tolist() == [False] + [True] * (len(e.ids) - 1)


def test_blank_lines_are_skipped_and_lines_keep_their_file_numbers(tok, tmp_path):
    path = write_jsonl(tmp_path, {"text": "a b"}, "", "   ", {"text": "c d"})
    assert [e.line for e in read_examples(path, tok, 512)] == [1, 4]


# --- bad lines -------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "oops"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"foo": "bar"}, "unknown line format with keys ['foo']"),
    ({"text": "a", "prompt": "b"}, "unknown line format with keys ['prompt', 'text']"),
    ({"prompt": "a"}, "unknown line format with keys ['prompt']"),
    ({"prompt": "a", "completion": 3}, '"completion" must be a string'),
    ({"prompt": None, "completion": "b"}, '"prompt" must be a string'),
    ({"text": ""}, '"text" is empty'),
    ({"prompt": "a", "completion": ""}, '"completion" is empty'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": 5}]}, 'message 0 must be an object with string "role" and "content"'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ({"messages": [CHAT[1], CHAT[1], CHAT[2]]}, "Conversation roles must alternate"),  # the template's own check
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_bad_line_is_named_by_file_and_line_number(tok, tmp_path, bad, message):
    path = write_jsonl(tmp_path, {"text": "fine"}, "", bad, {"text": "never read"})
    with pytest.raises(DataError) as info:
        read_examples(path, tok, 512)
    assert str(info.value).startswith(f"{path} line 3: ")
    assert message in str(info.value)


def test_a_template_that_is_not_prefix_stable_is_refused(tok, tmp_path):
    # The generation prompt is not what the template writes before an answer.
    unstable = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    weird = Tokenizer.from_parts(tok.hf, {**tok.config, "chat_template": unstable})
    with pytest.raises(DataError, match=r"line 1: the chat template does not render .* assistant message 1"):
        read_examples(write_jsonl(tmp_path, {"messages": CHAT[1:3]}), weird, 512)


def test_an_example_with_no_trained_token_is_an_error(tok, tmp_path):
    # No BOS, no EOS: a one-token text has nothing to predict.
    hf = type(tok.hf).from_str(tok.hf.to_str())
    hf.post_processor = None
    bare = Tokenizer.from_parts(hf, {})
    assert len(bare.encode("a")) == 1
    with pytest.raises(DataError, match=r"line 2: nothing to train on"):
        read_examples(write_jsonl(tmp_path, {"text": "a b c"}, {"text": "a"}), bare, 512)


def test_long_examples_keep_their_start_and_are_skipped_if_nothing_trained_remains(tok, tmp_path):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    text = "Once upon a time, in a small village by the sea"
    path = write_jsonl(tmp_path, {"prompt": long_prompt, "completion": "yes"}, {"text": text}, {"text": "ok"})
    examples = read_examples(path, tok, 8)
    assert len(tok.encode(long_prompt)) > 8 and len(tok.encode(text)) > 8
    assert [e.line for e in examples] == [2, 3]
    assert examples.truncated == 2 and examples.skipped == 1
    assert examples[0].ids.tolist() == tok.encode(text)[:8]
    assert examples[1].ids.tolist() == tok.encode("ok") + [EOS]


# --- alignment and buckets -------------------------------------------------------------


def test_batches_shift_ids_into_inputs_and_targets(tok, tmp_path):
    [e] = read_examples(write_jsonl(tmp_path, {"prompt": "Hi", "completion": " there"}), tok, 512)
    batch = next(batches_once([e], 1, 512))
    n = len(e.ids) - 1
    assert batch.tokens.shape == (1, 32) and batch.tokens.dtype == np.int32
    assert batch.tokens[0, :n].tolist() == e.ids[:-1].tolist()
    assert batch.targets[0, :n].tolist() == e.ids[1:].tolist()
    assert batch.weights.dtype == np.float32
    assert batch.weights[0, :n].tolist() == e.trained[1:].astype(float).tolist()
    assert batch.weights[0].sum() == len(tok.encode(" there", add_special_tokens=False)) + 1
    assert batch.positions[0].tolist() == list(range(n)) + [-1] * (32 - n)
    assert batch.segments[0].tolist() == [1] * n + [0] * (32 - n)
    assert not batch.tokens[0, n:].any() and not batch.targets[0, n:].any() and not batch.weights[0, n:].any()


@pytest.mark.parametrize("n, max_length, width", [
    (1, 512, 32), (32, 512, 32), (33, 512, 64), (64, 512, 64), (65, 512, 128), (300, 512, 512),
    (33, 40, 40), (1, 16, 16), (100, 100, 100),
])
def test_bucket_length_is_the_next_power_of_two_from_32_capped_at_max_length(n, max_length, width):
    assert bucket_length(n, max_length) == width


def test_bucket_length_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        bucket_length(101, 100)


# --- training stream -------------------------------------------------------------------


def numbered(count, length=lambda k: 3 + k % 5) -> list[Example]:
    """Example k has ids 100*k, 100*k+1, ... so a row tells which examples it holds."""
    return [make(k + 1, 100 * k + np.arange(length(k))) for k in range(count)]


def row_examples(batch) -> list[list[int]]:
    """Per row, the example numbers (by segment) it holds."""
    return [[int(batch.tokens[b, batch.segments[b] == s][0]) // 100 for s in range(1, batch.segments[b].max() + 1)]
            for b in range(len(batch.tokens))]


def test_batches_have_fixed_rows_bucketed_widths_and_cover_each_epoch_once():
    examples = numbered(12, length=lambda k: 3 + 10 * k)  # 2 .. 112 input tokens
    stream = Batches(examples, batch_size=4, max_length=128, seed=7)
    epoch = [next(stream) for _ in range(3)]
    seen = []
    for batch in epoch:
        assert batch.tokens.shape[0] == 4 and all(a.shape == batch.tokens.shape for a in batch)
        longest = int((batch.positions >= 0).sum(axis=1).max())
        assert batch.tokens.shape[1] == bucket_length(longest, 128)
        seen += [k for row in row_examples(batch) for k in row]
    assert sorted(seen) == list(range(12)) and seen != list(range(12))  # all, once, shuffled
    assert stream.state() == {"epoch": 1, "index": 0, "examples": 12}
    second = [k for _ in range(3) for row in row_examples(next(stream)) for k in row]
    assert sorted(second) == list(range(12)) and second != seen  # a new order per epoch


def test_a_batch_crossing_an_epoch_end_is_filled_from_the_next_epoch():
    stream = Batches(numbered(5), batch_size=2, max_length=32, seed=0)
    rows = [k for _ in range(5) for row in row_examples(next(stream)) for k in row]
    assert sorted(rows[:5]) == sorted(rows[5:]) == list(range(5))
    assert stream.state() == {"epoch": 2, "index": 0, "examples": 5}


def test_a_dataset_smaller_than_the_batch_repeats_examples_rather_than_pad():
    batch = next(Batches(numbered(2), batch_size=5, max_length=32))
    assert (batch.segments == 1).any(axis=1).all()
    assert sorted(k for row in row_examples(batch) for k in row) == [0, 0, 0, 1, 1]


def test_the_same_seed_gives_the_same_batches_and_another_seed_does_not():
    def firsts(seed):
        return [k for _ in range(4) for row in row_examples(next(Batches(numbered(16), 4, 32, seed))) for k in row]
    assert firsts(3) == firsts(3) and firsts(3) != firsts(4)


@pytest.mark.parametrize("pack", [False, True])
def test_a_restored_stream_yields_the_batches_the_original_would_have(pack):
    examples = numbered(9, length=lambda k: 3 + 7 * k)
    original = Batches(examples, 3, 64, seed=11, pack=pack)
    for _ in range(4):
        next(original)
    saved = json.loads(json.dumps(original.state()))
    expected = [next(original) for _ in range(5)]
    resumed = Batches(examples, 3, 64, seed=11, pack=pack)
    resumed.restore(saved)
    for want, got in zip(expected, [next(resumed) for _ in range(5)], strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_restore_refuses_a_state_from_other_data():
    state = Batches(numbered(9), 3, 64).state()
    with pytest.raises(DataError, match="had 9 training examples, this has 8"):
        Batches(numbered(8), 3, 64).restore(state)


def test_batches_refuse_examples_longer_than_max_length():
    with pytest.raises(DataError, match="line 2 has 40 tokens"):
        Batches([make(1, range(5)), make(2, range(40))], 2, 32)


# --- packing ---------------------------------------------------------------------------


def test_packed_rows_restart_positions_and_number_segments_per_example():
    # 5 ids -> 4 input tokens each: exactly 4 examples fill a 16-token row.
    batch = next(Batches(numbered(8, length=lambda k: 5), batch_size=2, max_length=16, pack=True))
    assert batch.tokens.shape == (2, 16)
    assert batch.positions.tolist() == [[0, 1, 2, 3] * 4] * 2
    assert batch.segments.tolist() == [[1] * 4 + [2] * 4 + [3] * 4 + [4] * 4] * 2
    # Every target is the next id of the same example: none reaches into the next one.
    assert (batch.targets == batch.tokens + 1).all()
    assert batch.weights.tolist() == [[1.0] * 16] * 2
    assert sorted(k for row in row_examples(batch) for k in row) == list(range(8))


def test_packing_is_greedy_in_stream_order_and_leaves_the_misfit_for_the_next_row():
    examples = numbered(10, length=lambda k: 4 + 3 * k)  # 3 .. 30 input tokens
    inputs = [len(e.ids) - 1 for e in examples]
    packed = Batches(examples, batch_size=2, max_length=32, seed=5, pack=True)
    rows = [row for _ in range(6) for row in row_examples(next(packed))]
    single = Batches(examples, batch_size=1, max_length=32, seed=5)
    order = [row_examples(next(single))[0][0] for _ in range(sum(map(len, rows)))]
    assert [k for row in rows for k in row] == order  # the unpacked stream's order
    assert packed.state() == single.state()  # and it stands where that one does
    for row, following in zip(rows, rows[1:]):
        used = sum(inputs[k] for k in row)
        assert used <= 32 < used + inputs[following[0]]  # full up to the first misfit
    assert max(map(len, rows)) > 1


def test_packed_rows_do_not_take_an_example_that_would_overflow():
    # 20 + 20 input tokens do not fit 32: one example per row, padded to the bucket.
    batch = next(Batches(numbered(2, length=lambda k: 21), batch_size=2, max_length=32, pack=True))
    assert batch.segments.max(axis=1).tolist() == [1, 1]
    assert batch.positions[:, 20:].tolist() == [[-1] * 12] * 2


# --- validation ------------------------------------------------------------------------


def test_batches_once_keeps_order_and_pads_the_last_batch_with_zero_weight_rows():
    batches = list(batches_once(numbered(5), 2, 32))
    assert [row_examples(b)[:2] for b in batches[:2]] == [[[0], [1]], [[2], [3]]]
    last = batches[-1]
    assert last.tokens.shape == (2, 32) and row_examples(last)[0] == [4]
    assert not last.weights[1].any() and not last.tokens[1].any() and (last.positions[1] == -1).all()
    assert (last.segments[1] == 0).all()


def test_split_validation_is_deterministic_disjoint_and_complete():
    examples = numbered(20)
    train, val = split_validation(examples, 0.25, seed=1)
    again_train, again_val = split_validation(examples, 0.25, seed=1)
    assert [e.line for e in train] == [e.line for e in again_train]
    assert [e.line for e in val] == [e.line for e in again_val]
    assert len(val) == 5 and len(train) == 15
    assert sorted(e.line for e in train + val) == list(range(1, 21))
    assert [e.line for e in val] == sorted(e.line for e in val)  # file order kept
    assert [e.line for e in split_validation(examples, 0.25, seed=2)[1]] != [e.line for e in val]


def test_split_validation_with_fraction_zero_holds_nothing_out_and_a_tiny_fraction_holds_one():
    examples = numbered(10)
    train, val = split_validation(examples, 0.0, seed=0)
    assert val == [] and train == examples
    assert len(split_validation(examples, 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="cannot hold out 1 of 1"):
        split_validation(numbered(1), 0.5, seed=0)
