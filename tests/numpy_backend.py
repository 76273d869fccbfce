"""A second, trivial backend for tests: one small family in plain numpy behind the protocol
of mrs/backends. If generate, stream, chat sessions and the batcher run on it unchanged,
nothing above the seam asks which backend runs.

The "toy" family is a bigram model with a position term: the next-token logits after
token t at position p are ``W[t] + P[p % 3]``. Its cache holds, per slot, the last token
and the length; sampling is greedy (temperature 0) or a softmax draw at the row's
temperature from a per-(seed, step) numpy generator, among the ``allowed`` tokens.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np

from mrs.backends import Sampled
from mrs.errors import MrsError
from mrs.families import Family
from mrs.model import Model


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    max_position_embeddings: int = 512
    seed: int = 0

    @classmethod
    def from_hf(cls, config: dict) -> ToyConfig:
        return cls(int(config["vocab_size"]), int(config.get("max_position_embeddings", 512)),
                   int(config.get("seed", 0)))


FAMILY = Family("toy", types.SimpleNamespace(ignored=lambda name: False), ToyConfig)


@dataclass
class ToyCache:
    last: np.ndarray        # [slots] int32
    lengths: np.ndarray     # [slots] int32
    max_len: int


class Pending:
    def __init__(self, sampled: Sampled):
        self.sampled, self.tokens = sampled, sampled.tokens

    def read(self, top: bool = False) -> Sampled:
        return self.sampled


class ToyWeights:
    def __init__(self, config: ToyConfig):
        rng = np.random.default_rng(config.seed)
        self.W = rng.normal(size=(config.vocab_size, config.vocab_size)).astype(np.float32) * 3
        self.P = rng.normal(size=(3, config.vocab_size)).astype(np.float32)

    def next_logits(self, token: int, position: int) -> np.ndarray:
        return self.W[token] + self.P[position % 3]


def reference_greedy(weights: ToyWeights, prompt: list[int], steps: int) -> list[int]:
    """The toy model's greedy continuation, computed directly (the oracle)."""
    out, last, length = [], prompt[-1], len(prompt)
    for _ in range(steps):
        last = int(np.argmax(weights.next_logits(last, length - 1)))
        out.append(last)
        length += 1
    return out


class ToySteps:
    def __init__(self, weights: ToyWeights, vocab_size: int, num_top: int):
        self.weights, self.vocab_size, self.num_top = weights, vocab_size, num_top
        self.calls = {"prefill": 0, "prefill_slot": 0, "decode": 0}

    def sampling(self, params):
        return params

    def history(self, history):
        return np.array(history, np.int32)

    def tokens(self, tokens):
        return np.array(tokens, np.int32)

    def _sample(self, logits: np.ndarray, sampling, rows: np.ndarray, step, allowed) -> Sampled:
        B = logits.shape[0]
        tokens, logprobs = np.zeros(B, np.int32), np.zeros(B, np.float32)
        top_ids = np.zeros((B, self.num_top), np.int32)
        top_lps = np.zeros((B, self.num_top), np.float32)
        for b in range(B):
            z = logits[b].astype(np.float64)
            if allowed is not None:
                z = np.where(allowed[b], z, -np.inf)
            t = float(sampling.temperature[rows[b]])
            scaled = z / (t if t > 0 else 1.0)
            lp = scaled - np.logaddexp.reduce(scaled)
            if t == 0:
                tokens[b] = int(np.argmax(z))
            else:
                key = [int(k) for k in sampling.key[rows[b]]] + [int(np.asarray(step)[b])]
                tokens[b] = int(np.random.default_rng(key).choice(len(z), p=np.exp(lp)))
            logprobs[b] = lp[tokens[b]]
            order = np.argsort(-lp)[: self.num_top]
            top_ids[b], top_lps[b] = order, lp[order]
        return Sampled(tokens, logprobs, top_ids, top_lps)

    def _run(self, cache: ToyCache, slots: np.ndarray, tokens, positions):
        logits = np.zeros((len(slots), self.vocab_size), np.float32)
        for b, slot in enumerate(slots):
            valid = np.nonzero(positions[b] >= 0)[0]
            if valid.size:
                last = valid[-1]
                cache.last[slot] = tokens[b, last]
                cache.lengths[slot] = max(cache.lengths[slot], positions[b, last] + 1)
            logits[b] = self.weights.next_logits(int(cache.last[slot]), int(cache.lengths[slot]) - 1)
        return logits

    def prefill(self, cache, tokens, positions, sampling, history, step, allowed):
        self.calls["prefill"] += 1
        rows = np.arange(len(tokens))
        logits = self._run(cache, rows, np.asarray(tokens), np.asarray(positions))
        return Pending(self._sample(logits, sampling, rows, step, allowed)), cache

    def prefill_slot(self, width, cache):
        def run(cache, tokens, positions, slot, sampling, history, step, allowed):
            self.calls["prefill_slot"] += 1
            valid = np.asarray(positions)[0]
            cache.lengths[slot] = valid[valid >= 0].min()  # continue from the first position
            logits = self._run(cache, np.array([slot]), np.asarray(tokens), np.asarray(positions))
            return Pending(self._sample(logits, sampling, np.zeros(1, int), step, allowed)), cache

        return run

    def decode(self, cache, tokens, sampling, history, step, active, allowed):
        self.calls["decode"] += 1
        tokens = np.asarray(tokens)
        rows = np.arange(len(tokens))
        positions = np.where(active, cache.lengths, -1)[:, None]
        logits = self._run(cache, rows, tokens[:, None], positions)
        history = np.concatenate([history[:, 1:], tokens[:, None]], axis=1)
        return Pending(self._sample(logits, sampling, rows, step, allowed)), cache, history

    def put_row(self, array, slot, row):
        array = np.array(array, copy=True)
        array[slot] = np.asarray(row)[0]
        return array

    def compiled_count(self) -> int:
        return 0


class ToyRunner:
    backend = "numpy"
    device_name = "host"
    on_accelerator = False
    dtype_name = "float32"

    def __init__(self, config: ToyConfig):
        self.config = config
        self.weights = ToyWeights(config)
        self.num_params = self.weights.W.size + self.weights.P.size
        self._steps: dict[int, ToySteps] = {}

    def new_cache(self, slots, max_len):
        return ToyCache(np.zeros(slots, np.int32), np.zeros(slots, np.int32), int(max_len))

    def cache_max_len(self, cache):
        return cache.max_len

    def cache_lengths(self, cache):
        return cache.lengths.copy()

    def with_lengths(self, cache, lengths):
        return ToyCache(cache.last.copy(), np.asarray(lengths, np.int32).copy(), cache.max_len)

    def rewindable(self, cache):
        return False     # the last token alone cannot be rewound past: like a recurrent state

    def steps(self, num_top=0):
        if num_top not in self._steps:
            self._steps[num_top] = ToySteps(self.weights, self.config.vocab_size, num_top)
        return self._steps[num_top]

    def logits(self, tokens):
        out = np.zeros(tokens.shape + (self.config.vocab_size,), np.float32)
        for b, row in enumerate(tokens):
            for p, token in enumerate(row):
                out[b, p] = self.weights.next_logits(int(token), p)
        return out

    def embed(self, tokens, mask, pooling):
        raise MrsError("the toy backend has no encoder")

    def compiled_count(self):
        return 0


def load(path, family, config, *, dtype=None, device=None):
    return ToyRunner(config)


def toy_model(folder, tokenizer=None, vocab_size: int | None = None) -> Model:
    """A Model on the numpy backend (vocabulary of the tokenizer's size when one is given)."""
    vocab = vocab_size or tokenizer.hf.get_vocab_size(with_added_tokens=True)
    config = ToyConfig(vocab)
    return Model(folder, {"model_type": "toy"}, FAMILY, config, ToyRunner(config), tokenizer)
