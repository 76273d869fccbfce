"""Generation behaviour on the tiny Llama fixture: stops, streaming, seeds, no
recompiles, chat templates, and sessions that prefill only new tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mrs
from mrs.engine.session import ChatSession
from mrs.errors import (
    ContextLengthError,
    InvalidParameterError,
    MrsError,
    TokenizerError,
)
from mrs.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


@pytest.fixture(scope="module")
def golden(fixture_path):
    return dict(np.load(fixture_path("llama") / "golden.npz"))


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = CompileCounter()


def test_a_200_token_generation_compiles_nothing_after_warm_up(llama):
    prompt = "Once upon a time"
    mrs.generate(llama, prompt, max_tokens=8, temperature=0.7, seed=1, ignore_eos=True)   # warm-up
    before, before_cached = COMPILES.count, llama.steps.compiled_count()
    done = mrs.generate(llama, prompt, max_tokens=200, temperature=0.9, top_k=5, top_p=0.8, seed=2,
                        repeat_penalty=1.3, ignore_eos=True)
    assert done.completion_tokens == 200
    assert COMPILES.count == before and llama.steps.compiled_count() == before_cached


def test_decode_reads_every_weight_where_it_lies_without_a_transposed_copy(llama):
    """A weight transposed inside the step is copied through memory on every token (with
    [K, G+2, H, D] q/k/v weights XLA's CPU backend did that, and decode ran 3x slower)."""
    from mrs.sampling import SamplingParams

    slots, max_len = 1, 256
    steps = llama.runner.compiled()
    cache = llama.init_cache(slots, max_len)
    sampling = SamplingParams.stack([SamplingParams.make(temperature=0)] * slots)
    history = jax.numpy.full((slots, 8), -1, jax.numpy.int32)
    step = jax.numpy.zeros((slots,), jax.numpy.int32)
    text = steps.decode.lower(llama.runner.params, step, cache, sampling, history, step,
                              jax.numpy.ones((slots,), bool), steps.all_allowed(slots)).compile().as_text()
    moved = [line for line in text.splitlines()
             if (" transpose(" in line or " copy(" in line) and "op_name=\"params[" in line]
    assert not moved, moved[:3]


def test_decode_updates_the_donated_cache_in_place(llama):
    """A step that copied its cache would move the whole cache through memory for each token."""
    from mrs.sampling import SamplingParams

    slots, max_len = 1, 256          # one slot: where XLA's copy insertion used to copy each layer
    cache = llama.init_cache(slots, max_len)
    sampling = SamplingParams.stack([SamplingParams.make(temperature=0)] * slots)
    history = jax.numpy.full((slots, 8), -1, jax.numpy.int32)
    step = jax.numpy.zeros((slots,), jax.numpy.int32)
    steps = llama.runner.compiled()
    text = steps.decode.lower(llama.runner.params, step, cache, sampling, history, step, jax.numpy.ones((slots,), bool),
                              steps.all_allowed(slots)).compile().as_text()
    layer = cache.keys[0]
    shape = "f32[" + ",".join(map(str, layer.shape)) + "]"
    copies = [line for line in text.splitlines() if " copy(" in line and f"= {shape}" in line]
    assert not copies, copies[:3]


def test_decode_attention_per_query_group_equals_the_batched_contraction():
    """The T = 1 path of the cache attention (one matrix-vector product per query group)."""
    from mrs.archs.layers import _cache_mix, _cache_scores

    rng = np.random.default_rng(0)
    B, K, G, S, H = 2, 3, 4, 16, 8
    q = jax.numpy.asarray(rng.standard_normal((B, 1, K, G, H)), jax.numpy.float32)
    keys = jax.numpy.asarray(rng.standard_normal((B, K, S, H)), jax.numpy.float32)
    probs = jax.numpy.asarray(rng.random((B, K, 1, G, S)), jax.numpy.float32)
    values = jax.numpy.asarray(rng.standard_normal((B, K, H, S)), jax.numpy.float32)
    np.testing.assert_allclose(_cache_scores(q, keys), np.einsum("BTKGH,BKSH->BKTGS", q, keys), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_cache_mix(probs, values), np.einsum("BKTGS,BKHS->BKTGH", probs, values),
                               rtol=1e-5, atol=1e-5)


def test_eos_ids_come_from_generation_config_list(llama, fixture_path):
    import json

    listed = json.loads((fixture_path("llama") / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(listed, list) and set(listed) <= llama.eos_ids


def test_generation_stops_at_an_eos_token(llama, golden):
    prompt, expected = golden["prompt_1"][0].tolist(), golden["greedy_1"].tolist()
    eos = expected[5]
    saved, llama.eos_ids = llama.eos_ids, frozenset({eos})
    try:
        done = mrs.generate(llama, prompt, max_tokens=64, temperature=0)
    finally:
        llama.eos_ids = saved
    assert done.finish_reason == "stop"
    assert done.token_ids == expected[:expected.index(eos)]


def test_stop_string_cuts_text_and_finishes_with_stop(llama):
    full = mrs.generate(llama, "The weather", max_tokens=40, temperature=0, ignore_eos=True).text
    stop = full[10:13]
    assert stop and full.index(stop) >= 0
    done = mrs.generate(llama, "The weather", max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00"])
    assert done.finish_reason == "stop"
    assert done.text == full[:full.index(stop)]
    streamed = "".join(mrs.stream(llama, "The weather", max_tokens=40, temperature=0, ignore_eos=True, stop=stop))
    assert streamed == done.text


def test_stream_yields_exactly_the_generated_text(llama):
    options = dict(max_tokens=30, temperature=0.8, seed=7, ignore_eos=True)
    pieces = list(mrs.stream(llama, "héllo wörld 日本語", **options))
    assert "".join(pieces) == mrs.generate(llama, "héllo wörld 日本語", **options).text


def test_stream_decoder_never_splits_a_utf8_character(llama):
    text = "héllo wörld 日本語 🙂 naïve café"
    ids = llama.tokenizer.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(llama.tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == llama.tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_same_seed_same_tokens_and_batch_rows_equal_their_batch_1_runs(llama):
    options = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=1234, ignore_eos=True)
    a = mrs.generate(llama, "abc", **options)
    b = mrs.generate(llama, "abc", **options)
    assert a.token_ids == b.token_ids
    batch = mrs.generate_batch(llama, ["abc", "a much longer prompt than the first one"], **options)
    assert batch[0].token_ids == a.token_ids
    other = mrs.generate(llama, "abc", **{**options, "seed": 4321})
    assert other.token_ids != a.token_ids


def test_chat_template_renders_like_transformers(llama, fixture_path):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    hf = AutoTokenizer.from_pretrained(fixture_path("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    for add in (True, False):
        assert llama.tokenizer.apply_chat_template(messages, add_generation_prompt=add) == \
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(expected_ids, "keys"):
        expected_ids = expected_ids["input_ids"]
    assert llama.tokenizer.encode_chat(messages) == list(expected_ids)
    with pytest.raises(TokenizerError, match="alternate"):
        llama.tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_messages_generate_from_the_templated_prompt(llama):
    messages = [{"role": "user", "content": "Hi"}]
    by_messages = mrs.generate(llama, messages, max_tokens=8, temperature=0, ignore_eos=True)
    by_ids = mrs.generate(llama, llama.tokenizer.encode_chat(messages), max_tokens=8, temperature=0,
                          ignore_eos=True)
    assert by_messages.token_ids == by_ids.token_ids
    assert by_messages.prompt_tokens == len(llama.tokenizer.encode_chat(messages))


def test_chat_session_second_turn_prefills_only_new_tokens(llama):
    session = ChatSession(llama, max_len=512)
    messages = [{"role": "user", "content": "Tell me something"}]
    first = "".join(session.stream(messages, max_tokens=12, temperature=0, ignore_eos=True))
    assert session.last_prefill_tokens == len(llama.tokenizer.encode_chat(messages))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "More"}]
    second = "".join(session.stream(messages, max_tokens=12, temperature=0, ignore_eos=True))
    new_text = "<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"
    # The new text, plus the reply's last token: it was sampled, never fed, so not cached yet.
    assert session.last_prefill_tokens == len(llama.tokenizer.encode(new_text, add_special_tokens=False)) + 1
    assert second == session.last.text
    # The reused turn gives the tokens a fresh run over the same token sequence gives.
    replay = mrs.generate(llama, session._ids[:len(session._ids) - len(session.last.token_ids)], max_tokens=12,
                          temperature=0, ignore_eos=True)
    assert replay.token_ids == session.last.token_ids


@pytest.mark.parametrize("options, name", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"nonsense": 1}, "nonsense"),
])
def test_invalid_generation_options_raise_a_typed_error_naming_the_option(llama, options, name):
    with pytest.raises(InvalidParameterError, match=name):
        mrs.generate(llama, "hi", **options)


def test_prompt_longer_than_the_context_is_a_context_error(fixture_path):
    model = mrs.load(str(fixture_path("llama-dynamic")))
    with pytest.raises(ContextLengthError, match="context"):
        mrs.generate(model, list(range(1, model.context_length + 5)), max_tokens=4)


def test_bad_prompts_are_typed_errors(llama):
    with pytest.raises(InvalidParameterError):
        mrs.generate(llama, [llama.vocab_size + 10])
    with pytest.raises(InvalidParameterError):
        mrs.generate(llama, 3.5)
    with pytest.raises(InvalidParameterError):
        mrs.generate_batch(llama, [])
    with pytest.raises(MrsError):
        mrs.generate(llama, [{"role": "user", "content": 5}])
