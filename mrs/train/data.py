"""Fine-tuning data: JSONL lines -> token ids with a per-token loss mask -> fixed-shape batches.

A line is one of three formats, told apart by its keys:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}  loss on assistant turns
    {"prompt": "...", "completion": "..."}                                          loss on the completion + EOS
    {"text": "..."}                                                                 loss on every token

Batches are next-token aligned (``tokens`` predict ``targets``), padded to a few bucketed
widths so a jitted train step compiles only a handful of shapes, and come from a seeded,
resumable stream of epochs. numpy only: the train step owns the JAX side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mrs.errors import MrsError, TokenizerError
from mrs.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
MIN_BUCKET = 32


class DataError(MrsError, ValueError):
    """A fine-tuning data file (or a dataset built from one) cannot be used as it is."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays do not compare to one bool
class Example:
    """One tokenized line. ``trained[i]`` says ids[i] is a target (predicted from ids[:i]);
    ``trained[0]`` is always False since nothing precedes the first token."""

    ids: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]
    line: int  # 1-based line of the file it came from


class Examples(list):
    """``read_examples``' result: a list of Example, plus how many lines were cut to
    ``max_length`` (``truncated``) and how many of those kept no trained token (``skipped``)."""

    truncated: int = 0
    skipped: int = 0


class Batch(NamedTuple):
    """Training arrays, all [B, T]. A NamedTuple so that JAX treats it as a pytree.

    ``weights`` is 1.0 where ``targets`` is a trained token. ``positions`` restart at 0 for
    every example (-1 on padding) and ``segments`` number the examples of a row 1, 2, ...
    (0 on padding). Unpacked rows hold one example (segment 1); a packed row holds several.
    The trainer runs a packed row as one sequence (``batch_arrays``): no target crosses an
    example's end, but a token sees the earlier examples of its row.
    """

    tokens: np.ndarray  # int32: inputs, ids[:-1] of each example
    targets: np.ndarray  # int32: ids[1:]
    weights: np.ndarray  # float32: trained[1:]
    positions: np.ndarray  # int32
    segments: np.ndarray  # int32


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_examples(path: str | Path, tokenizer: Tokenizer, max_length: int) -> Examples:
    """Tokenize every non-blank line of a JSONL file; the first bad line raises a DataError
    naming the file and line. Examples longer than ``max_length`` keep their start."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (one input and one target), got {max_length}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"no data file {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = Examples()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        ids, trained = _tokenize_line(text, tokenizer, where)
        trained[0] = False
        if not any(trained):
            raise DataError(f"{where}: nothing to train on (the example is a single token)")
        if len(ids) > max_length:
            examples.truncated += 1
            ids, trained = ids[:max_length], trained[:max_length]
            if not any(trained):  # the prompt alone fills max_length
                examples.skipped += 1
                continue
        examples.append(Example(np.array(ids, np.int32), np.array(trained, bool), number))
    if examples.truncated:
        log.info("%s: %d examples truncated to %d tokens, %d of them skipped (no trained token left)",
                 path, examples.truncated, max_length, examples.skipped)
    return examples


def _tokenize_line(text: str, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """One JSONL line -> (ids, trained), or a DataError saying what is wrong with it."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    eos = tokenizer.token_id(tokenizer.eos_token)
    eos_ids = [] if eos is None else [eos]
    if keys == {"text"}:
        _require_text(row, "text", where)
        ids = tokenizer.encode(row["text"]) + eos_ids
        return ids, [True] * len(ids)
    if keys == {"prompt", "completion"}:
        if not isinstance(row["prompt"], str):
            raise DataError(f'{where}: "prompt" must be a string')
        _require_text(row, "completion", where)
        prompt = tokenizer.encode(row["prompt"])
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + eos_ids
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if keys == {"messages"}:
        return _tokenize_chat(row["messages"], tokenizer, where)
    raise DataError(f"{where}: unknown line format with keys {sorted(keys)}; expected exactly one of "
                    '{"messages"}, {"prompt", "completion"} or {"text"}')


def _require_text(row: dict, key: str, where: str) -> None:
    if not isinstance(row[key], str):
        raise DataError(f'{where}: "{key}" must be a string')
    if not row[key]:
        raise DataError(f'{where}: "{key}" is empty')


def _tokenize_chat(messages: object, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Render with the chat template and train on each assistant turn: the text between the
    template's rendering of the turns before it (with the generation prompt) and through it."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: message {i} must be an object with string "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")

    def render(upto: int, add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=add_generation_prompt)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None

    full = render(len(messages), False)
    pieces: list[tuple[str, bool]] = []  # consecutive slices of `full`, trained or not
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        # Only a prefix-stable template lets us find the answer's characters inside `full`.
        if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
            raise DataError(f"{where}: the chat template does not render the conversation up to assistant "
                            f"message {i} as a prefix of the whole, so its answer cannot be located; "
                            'write such lines as {"prompt": ..., "completion": ...} instead')
        pieces += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in pieces:
        # No special tokens: the template writes BOS itself if the model wants one.
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        trained += [is_trained] * len(piece)
    return ids, trained


def split_validation(examples: Sequence[Example], fraction: float,
                     seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out ``round(fraction * len)`` examples (at least one if fraction > 0), chosen by
    ``seed``; both parts keep the file's order."""
    if not 0 <= fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {fraction}")
    n_val = max(round(fraction * len(examples)), 1) if fraction > 0 else 0
    if n_val and n_val >= len(examples):
        raise DataError(f"cannot hold out {n_val} of {len(examples)} examples for validation and still train; "
                        "add data or pass a separate validation file")
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_val].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def bucket_length(n: int, max_length: int) -> int:
    """The row width for ``n`` tokens: the smallest of 32, 64, 128, ... holding n, capped at
    ``max_length``, so the train step sees only a few shapes."""
    if n > max_length:
        raise ValueError(f"{n} tokens do not fit max_length {max_length}")
    width = MIN_BUCKET
    while width < n:
        width *= 2
    return min(width, max_length)


def _collate(rows: list[list[Example]], max_length: int) -> Batch:
    """Rows of examples (one each unless packed; none for a padding row) -> a Batch as wide
    as the bucket of its fullest row."""
    fill = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    shape = (len(rows), bucket_length(fill, max_length))
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    positions, segments = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    for b, row in enumerate(rows):
        t = 0
        for segment, e in enumerate(row, 1):
            # Shift each example on its own, so no target crosses into the next packed one.
            n = len(e.ids) - 1
            tokens[b, t:t + n], targets[b, t:t + n], weights[b, t:t + n] = e.ids[:-1], e.ids[1:], e.trained[1:]
            positions[b, t:t + n], segments[b, t:t + n] = np.arange(n), segment
            t += n
    return Batch(tokens, targets, weights, positions, segments)


def _check_lengths(examples: Sequence[Example], max_length: int) -> None:
    for e in examples:
        if not 2 <= len(e.ids) <= max_length:
            raise DataError(f"the example from line {e.line} has {len(e.ids)} tokens; batches need "
                            f"2 to max_length={max_length} (read the data with the same max_length)")


class Batches:
    """Endless training batches of exactly ``batch_size`` rows: epoch after epoch, each
    in its own seeded order, a batch that crosses an epoch's end taking the next epoch's
    first examples. ``pack=True`` fills each row with as many whole examples as fit in
    ``max_length`` tokens (see Batch for positions and segments)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, max_length: int, seed: int = 0,
                 pack: bool = False):
        if not examples:
            raise DataError("no training examples")
        _check_lengths(examples, max_length)
        self.examples, self.batch_size, self.max_length = list(examples), batch_size, max_length
        self.seed, self.pack = seed, pack
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def state(self) -> dict:
        """Where the stream stands, as a small JSON-able dict for a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        """Continue from ``state()``: the next batches are those the saved iterator would have given."""
        if state["examples"] != len(self.examples):
            raise DataError(f"the checkpoint's data had {state['examples']} training examples, this has "
                            f"{len(self.examples)}: resume with the same data file and settings")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _peek(self) -> Example:
        # Each epoch's order depends on (seed, epoch) alone, so restoring needs no RNG state.
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = (self.epoch, rng.permutation(len(self.examples)))
        return self.examples[self._order[1][self.index]]

    def _take(self) -> Example:
        example = self._peek()
        self.index += 1
        if self.index == len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        return example

    def _packed_row(self) -> list[Example]:
        row = [self._take()]
        used = len(row[0].ids) - 1
        # Greedy, in stream order: an example that does not fit starts the next row.
        while used + len(self._peek().ids) - 1 <= self.max_length:
            row.append(self._take())
            used += len(row[-1].ids) - 1
        return row

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        take = self._packed_row if self.pack else lambda: [self._take()]
        return _collate([take() for _ in range(self.batch_size)], self.max_length)


def batches_once(examples: Sequence[Example], batch_size: int, max_length: int) -> Iterator[Batch]:
    """One pass in order (for validation); the last batch is filled with all-padding,
    zero-weight rows so every batch has ``batch_size`` rows."""
    _check_lengths(examples, max_length)
    for start in range(0, len(examples), batch_size):
        rows = [[e] for e in examples[start:start + batch_size]]
        yield _collate(rows + [[]] * (batch_size - len(rows)), max_length)


def batch_arrays(batch: Batch, packed: bool) -> dict[str, np.ndarray]:
    """The arrays the loss reads. A packed row runs as one sequence (positions continue
    across its examples, which attend to the earlier ones, as the classic packing of
    TRL's ConstantLengthDataset does, not its newer per-example positions); its
    targets never cross an example's end."""
    positions = batch.positions
    if packed:
        width = positions.shape[1]
        positions = np.where(positions >= 0, np.arange(width, dtype=np.int32)[None, :], -1).astype(np.int32)
    return {"tokens": batch.tokens, "positions": positions, "targets": batch.targets, "weights": batch.weights}
