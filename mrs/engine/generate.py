"""generate(), stream() and generate_batch(): one prompt or a static batch, from
prompt to finished text, over the backend's prefill/decode steps (mrs/backends).

A step is dispatched before the previous step's tokens are read back, so the host
work of a step (detokenising, stop checks) overlaps the device work of the next.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrs.constrain import JsonConstraint, constraint_for
from mrs.engine.shapes import MIN_CACHE_BUCKET, MIN_PROMPT_BUCKET, bucket, step_positions
from mrs.errors import ContextLengthError, InvalidParameterError, MrsError
from mrs.sampling import SamplingParams
from mrs.tokenizer import StreamDecoder

Prompt = str | Sequence[int] | Sequence[dict]
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "seed")


@dataclass
class Completion:
    """A finished generation: text, generated ids, why it stopped, counts and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str                      # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float = 0.0             # evaluating the prompt tokens that were not cached
    decode_seconds: float = 0.0
    logprobs: list[float] = field(default_factory=list, repr=False)
    cached_tokens: int = 0                  # leading prompt tokens whose state was reused, not evaluated

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def encode_prompt(model: Any, prompt: Prompt, system: str | None = None) -> list[int]:
    """A str (raw text), a list of token ids, or chat messages -> token ids."""
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        if system is not None:
            return encode_prompt(model, [{"role": "system", "content": system},
                                         {"role": "user", "content": prompt}])
        if tokenizer is None:
            raise MrsError(f"model {model.name} has no tokenizer.json; pass token ids instead")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
                raise InvalidParameterError("messages", m, "a list of {'role': str, 'content': str}")
        messages = list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        if tokenizer is None:
            raise MrsError(f"model {model.name} has no tokenizer.json, so it cannot render chat messages")
        ids = tokenizer.encode_chat(messages)
    elif isinstance(prompt, (Sequence, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= model.vocab_size for t in ids):
            raise InvalidParameterError("prompt", "token ids", f"ids in [0, {model.vocab_size})")
    else:
        raise InvalidParameterError("prompt", type(prompt).__name__,
                                    "a string, a list of token ids, or a list of chat messages")
    if not ids:
        raise InvalidParameterError("prompt", prompt, "non-empty (it encodes to no tokens)")
    return ids


def _without_system(prompt: Prompt) -> bool:
    """Chat messages with no system message (where a model's default system prompt goes)."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and bool(prompt)
            and all(isinstance(m, dict) for m in prompt) and not any(m.get("role") == "system" for m in prompt))


def with_default_system(model: Any, messages: Sequence[dict]) -> list[dict]:
    """Chat messages with the model's default system prompt (Ollama's system layer) put
    first when they bring no system message of their own."""
    system = getattr(model, "default_system", None)
    if system and _without_system(messages):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InvalidParameterError("stop", stop, "a string or a list of strings")
    return tuple(s for s in stops if s)


class RowOutput:
    """One request's output state: tokens, text, stop-string holdback, finish, and the
    JSON constraint it must keep (if any)."""

    def __init__(self, model: Any, prompt_len: int, max_tokens: int, stops: tuple[str, ...], ignore_eos: bool,
                 constraint: JsonConstraint | None = None):
        self.decoder = StreamDecoder(model.tokenizer) if model.tokenizer else None
        self.eos = frozenset() if ignore_eos else model.eos_ids
        self.prompt_len, self.max_tokens, self.stops = prompt_len, max_tokens, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.constraint = constraint
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None

    def allowed(self) -> np.ndarray | None:
        """[vocab] bool tokens this row may take next; None when unconstrained."""
        return self.constraint.allowed() if self.constraint is not None else None

    def add(self, token: int, logprob: float) -> str:
        """Take one sampled token; return the text that is now safe to show."""
        if token in self.eos and self.constraint is None:
            self.finish = "stop"
        else:
            self.ids.append(token)
            self.logprobs.append(logprob)
            if self.decoder:
                self.text += self.decoder.push(token)
            if self.constraint is not None:
                self.constraint.advance(token)
                if self.constraint.complete or not self.constraint.allowed().any():
                    self.finish = "stop"
            if len(self.ids) >= self.max_tokens and not self.finish:
                self.finish = "length"
        if self.finish and self.decoder:
            self.text += self.decoder.flush()
        if self.stops:
            window = self.text[max(0, self.emitted - self.holdback):]
            hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:max(0, self.emitted - self.holdback) + min(hits)]
                self.finish = "stop"
        upto = len(self.text) if self.finish else max(self.emitted, len(self.text) - self.holdback)
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


def allowed_rows(vocab_size: int, rows: Sequence[RowOutput | None]) -> np.ndarray | None:
    """The [B, V] mask of a step: each constrained row's tokens, everything elsewhere
    (None when no row is constrained)."""
    masks = [r.allowed() if r is not None and r.finish is None else None for r in rows]
    if all(m is None for m in masks):
        return None
    everything = np.ones((vocab_size,), bool)
    return np.stack([everything if m is None else m for m in masks])


def _sampling_rows(count: int, sampling: dict) -> SamplingParams:
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise InvalidParameterError(sorted(unknown)[0], sampling[sorted(unknown)[0]],
                                    f"one of the sampling options {', '.join(SAMPLING_KEYS)}")
    # Rows sharing a seed get the same key: a row's tokens equal its batch-1 run.
    return SamplingParams.stack([SamplingParams.make(**sampling) for _ in range(count)])


@dataclass
class RunResult:
    """The end of a generation loop: completions, the cache, and every sampled token."""

    completions: list[Completion]
    cache: Any
    sampled: list[list[int]]


def run(model: Any, prompts: Sequence[Prompt], *, max_tokens: int = 256, stop=None, system: str | None = None,
        ignore_eos: bool = False, cache: Any = None, reuse: Sequence[int] | None = None,
        format: str | dict | None = None, **sampling: Any) -> Iterator[tuple[int, str] | RunResult]:
    """The generation loop: yields (row, text piece) as text appears, then a RunResult.

    With ``cache`` (one slot per prompt) and ``reuse[b]`` (how many leading prompt
    tokens of row b that cache already holds), only the rest of each prompt is
    prefilled — how a chat session reuses its conversation so far. ``format="json"``
    constrains every row to one JSON object, a dict to that JSON schema (mrs.constrain,
    mrs.schema).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise InvalidParameterError("max_tokens", max_tokens, "an integer >= 1")
    if not prompts:
        raise InvalidParameterError("prompts", prompts, "a non-empty list")
    if model.family.kind != "causal":
        raise MrsError(f"model {model.name} is an {model.family.kind} model: it embeds text but cannot generate; "
                       "use `mrs embed` / mrs.embed()")
    defaults = model.default_options            # what the model's packaging asks for (Ollama's params)
    sampling = {**{k: v for k, v in defaults.items() if k in SAMPLING_KEYS},
                **{k: v for k, v in sampling.items() if v is not None}}
    stops = _stop_strings(defaults.get("stop") if stop is None else stop)
    params = _sampling_rows(len(prompts), sampling)
    encoded = [encode_prompt(model, p, system if system is not None or not _without_system(p)
                             else model.default_system) for p in prompts]
    batch = len(encoded)
    longest = max(len(ids) for ids in encoded)
    runner = model.runner
    context = model.context_length if cache is None else min(model.context_length, runner.cache_max_len(cache))
    if longest >= context:
        raise ContextLengthError(f"prompt of {longest} tokens does not fit the context of {context} tokens "
                                 "(leaving room for at least one new token)")
    rows = [RowOutput(model, len(ids), min(int(max_tokens), context - len(ids)), stops, ignore_eos,
                      constraint_for(model, format)) for ids in encoded]
    constrained = any(r.constraint is not None for r in rows)
    new_tokens = max(r.max_tokens for r in rows)
    if cache is None:
        needed = max(len(ids) + r.max_tokens for ids, r in zip(encoded, rows))
        cache = model.init_cache(batch, bucket(needed, MIN_CACHE_BUCKET, context))
        reuse = [0] * batch
    reuse = [min(int(k), len(ids) - 1) for k, ids in zip(reuse or [0] * batch, encoded)]
    max_len = runner.cache_max_len(cache)
    width = bucket(max(len(ids) - k for ids, k in zip(encoded, reuse)), MIN_PROMPT_BUCKET, max_len)
    tokens = np.zeros((batch, width), np.int32)
    history = np.full((batch, max_len), -1, np.int32)
    for b, (ids, k) in enumerate(zip(encoded, reuse)):
        tokens[b, :len(ids) - k] = ids[k:]
        history[b, max_len - len(ids):] = ids
    starts = np.asarray(reuse, np.int32)
    cache = runner.with_lengths(cache, starts)
    positions = step_positions(starts, np.asarray([len(ids) for ids in encoded], np.int32) - starts, width)
    steps = runner.steps(0)
    started = time.perf_counter()
    step = np.zeros((batch,), np.int32)   # host arrays: no device op per step to count them
    history = steps.history(history)
    sampling_rows = steps.sampling(params)
    current, cache = steps.prefill(cache, tokens, positions, sampling_rows, history, step,
                                   allowed_rows(model.vocab_size, rows))
    current.read()
    all_sampled: list[list[int]] = [[] for _ in range(batch)]
    prefill_done = time.perf_counter()

    def dispatch():
        nonlocal step, cache, history
        step = step + 1
        active = np.array([r.finish is None for r in rows])
        pending, cache, history = steps.decode(cache, current.tokens, sampling_rows, history, step, active,
                                               allowed_rows(model.vocab_size, rows))
        return pending

    for n in range(new_tokens):
        pending = None
        more = n + 1 < new_tokens
        if more and not constrained and not all(r.finish for r in rows):
            # Dispatch the next step before reading this one back: host and device overlap.
            # (Not when a row is constrained: its next mask depends on this step's token.)
            pending = dispatch()
        sampled, logprobs = current.read()[:2]
        for b, row in enumerate(rows):
            if row.finish is None:
                all_sampled[b].append(int(sampled[b]))
                piece = row.add(int(sampled[b]), float(logprobs[b]))
                if piece:
                    yield b, piece
        if more and constrained and not all(r.finish for r in rows):
            pending = dispatch()
        if pending is None or all(r.finish for r in rows):
            break
        current = pending
    finished = time.perf_counter()
    for row in rows:
        row.finish = row.finish or "length"
    yield RunResult(
        completions=[Completion(text=r.text, token_ids=r.ids, finish_reason=r.finish, prompt_tokens=r.prompt_len,
                                completion_tokens=len(r.ids), prompt_seconds=prefill_done - started,
                                decode_seconds=finished - prefill_done, logprobs=r.logprobs, cached_tokens=k)
                     for r, k in zip(rows, reuse, strict=True)],
        cache=cache, sampled=all_sampled)


def generate_batch(model: Any, prompts: Sequence[Prompt], **options: Any) -> list[Completion]:
    """Generate for several prompts in one batch; each row equals its batch-1 run."""
    for event in run(model, prompts, **options):
        if isinstance(event, RunResult):
            return event.completions
    raise AssertionError("generation loop ended without a result")


def generate(model: Any, prompt: Prompt, **options: Any) -> Completion:
    """Generate a completion for one prompt (str, token ids, or chat messages)."""
    return generate_batch(model, [prompt], **options)[0]


def stream(model: Any, prompt: Prompt, **options: Any) -> Iterator[str]:
    """Yield text pieces for one prompt as they are decoded (never half a character)."""
    for event in run(model, [prompt], **options):
        if not isinstance(event, RunResult):
            yield event[1]
