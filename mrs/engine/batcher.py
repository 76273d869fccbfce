"""Continuous batching: one decode loop per loaded model over a fixed set of cache slots.

A request is prefilled into a free slot and joins the running batch at the next decode
step; a finished or cancelled request frees its slot at once. Every shape is fixed
(B slots, the cache length S, the history window W = S), so nothing recompiles in
steady state: prompt widths are padded to `steps.bucket` sizes, and sampling values
are per-row arrays. Each request keeps its own sampling parameters, seed and step
counter, so its tokens do not depend on what else is running.

The loop runs in its own thread. A step is dispatched before the previous step's
tokens are read back, so detokenising and handing text to the requests (through each
request's ``sink``, called from this thread) overlaps the device work of the next step.

Prefill is compiled once per prompt bucket, ahead of time and on a helper thread: a
request whose bucket is new waits in the queue while it compiles, and the running
streams keep decoding instead of stalling behind the compiler.

A finished request's slot keeps its state for the next request that starts with it
(mrs.engine.prefixes: which slot, how much is reused).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrs.constrain import JsonConstraint, constraint_for
from mrs.engine.generate import Completion, RowOutput, allowed_rows
from mrs.engine.prefixes import SlotPrefixes
from mrs.engine.shapes import MIN_PROMPT_BUCKET, bucket, step_positions
from mrs.errors import ContextLengthError, InvalidParameterError, MrsError
from mrs.sampling import MAX_NUM_TOP, SamplingParams

log = logging.getLogger(__name__)


class ServerBusyError(MrsError):
    """The request queue is full; try again shortly (HTTP 503 with Retry-After)."""

    http_status = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class TokenLogprob:
    """One generated token with its log-prob and the most likely alternatives."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a request's sink receives: new text, and finally ``done`` (or ``error``)."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)  # only with logprobs
    ids: list[int] = field(default_factory=list)               # the new token ids (EOS not included)
    done: Completion | None = None
    error: BaseException | None = None
    queued_seconds: float = 0.0


@dataclass(eq=False)
class Request:
    """One generation request: prompt ids, limits, sampling row, and where output goes.

    ``sink`` is called from the batcher thread with each `Event`; it must not block.
    """

    prompt_ids: Sequence[int]
    sink: Callable[[Event], None]
    sampling: SamplingParams | None = None  # one row; None = SamplingParams.make()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    context: int | None = None  # cap on prompt + output tokens (below the cache length)
    format: str | dict | None = None  # "json" or a JSON schema: constrained output (mrs.constrain)
    cancelled: bool = False
    submitted_at: float = 0.0
    constraint: JsonConstraint | None = None  # set by submit() from ``format``
    width: int = 0                      # the prefill width the batcher last planned for it


class _Active:
    """A request in a slot: its output row and the tokens not yet handed out."""

    def __init__(self, request: Request, row: RowOutput, admitted_at: float):
        self.request, self.row = request, row
        self.admitted_at = admitted_at
        self.first_token_at = 0.0
        self.pending: list[TokenLogprob] = []
        self.pending_ids: list[int] = []
        self.finished = False
        self.sampled: list[int] = []    # every token sampled for it, in order
        self.reused = 0                 # leading prompt tokens its slot already held
        self.fed = 0                    # how many of them decode steps have written to the cache

    @property
    def live(self) -> bool:
        return not self.finished and not self.request.cancelled


class Batcher:
    """The decode loop of one model over ``slots`` cache rows of ``max_len`` tokens."""

    def __init__(self, model: Any, *, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 num_top: int = MAX_NUM_TOP, prefix_reuse: bool = True):
        if model.family.kind != "causal":
            raise MrsError(f"model {model.name} is an {model.family.kind} model and cannot generate")
        self.model = model
        self.slots = int(slots)
        self.max_len = int(min(max_len or model.context_length, model.context_length))
        self.max_queue = int(max_queue)
        self.num_top = num_top
        # Dynamic-NTK and longrope scale rotary frequencies by each step's length, so a reused
        # prefix's keys would differ from a cold prefill's past the original context: no reuse.
        rope = getattr(getattr(model, "config", None), "rope", None)
        self.prefix_reuse = bool(prefix_reuse) and getattr(rope, "kind", None) not in ("dynamic", "longrope")
        self.runner = model.runner
        self.steps = model.runner.steps(num_top)
        self._cond = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._rows: list[_Active | None] = [None] * self.slots
        self._inflight: tuple[Any, list[tuple[int, _Active]]] | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.requests_total = 0
        self.tokens_total = 0
        self.reused_total = 0                          # prompt tokens taken from slots, not prefilled
        self._prefills: dict[int, Any] = {}            # prompt bucket -> compiled prefill_slot
        self._compiling: dict[int, threading.Thread] = {}
        self._reset()

    # ----- public API (any thread) -------------------------------------------------

    def start(self) -> Batcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mrs-batcher[{self.model.name}]", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still queued or running get an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        """Queue a request (raises ContextLengthError, InvalidParameterError or ServerBusyError)."""
        ids = list(request.prompt_ids)
        if not ids:
            raise InvalidParameterError("prompt", "", "non-empty (it encodes to no tokens)")
        if any(not 0 <= t < self.model.vocab_size for t in ids):
            raise InvalidParameterError("prompt", "token ids", f"ids in [0, {self.model.vocab_size})")
        limit = self.max_len if not request.context else min(int(request.context), self.max_len)
        if len(ids) >= limit:
            raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the context of {limit} tokens "
                                     "(leaving room for at least one new token)")
        if not 0 <= request.top_logprobs <= self.num_top:
            raise InvalidParameterError("top_logprobs", request.top_logprobs, f"an integer in [0, {self.num_top}]")
        request.constraint = constraint_for(self.model, request.format)
        request.prompt_ids = ids
        request.max_tokens = max(0, min(int(request.max_tokens), limit - len(ids)))
        if request.sampling is None:
            request.sampling = SamplingParams.make()
        request.submitted_at = time.perf_counter()
        if request.max_tokens == 0:  # nothing to generate: answer at once, no slot needed
            request.sink(Event(done=Completion("", [], "length", len(ids), 0)))
            return request
        with self._cond:
            if self._closing:
                raise ServerBusyError(f"model {self.model.name} is unloading; retry")
            free = sum(1 for r in self._rows if r is None)  # about to be admitted, not waiting
            if len(self._pending) >= self.max_queue + free:
                raise ServerBusyError(f"the request queue of {self.model.name} is full "
                                      f"({self.max_queue} waiting); retry shortly")
            self._pending.append(request)
            free = self._free()
            if free:  # compile the bucket it will need on a helper thread, if new
                self._prefill_for(self._planned_width(request, *self.prefixes.plan(request.prompt_ids, free)))
            self.requests_total += 1
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: dropped from the queue, or its slot freed at the next step."""
        request.cancelled = True
        with self._cond:
            try:
                self._pending.remove(request)
            except ValueError:
                pass
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Gauges: slots, busy slots, queued requests, tokens free slots hold for reuse;
        counters: requests, tokens, reused prompt tokens, compilations."""
        with self._cond:
            busy = sum(1 for r in self._rows if r is not None)
            held = self.prefixes.tokens(self._free())
            return {"slots": self.slots, "busy": busy, "queued": len(self._pending), "cached": held,
                    "requests": self.requests_total, "tokens": self.tokens_total, "reused": self.reused_total,
                    "compiled": self.steps.compiled_count()}

    @property
    def idle(self) -> bool:
        s = self.stats()
        return s["busy"] == 0 and s["queued"] == 0

    def warmup(self, timeout: float = 600.0) -> None:
        """Compile prefill (smallest bucket) and decode by running a tiny request."""
        done = threading.Event()
        box: list[Event] = []

        def sink(event: Event) -> None:
            if event.done is not None or event.error is not None:
                box.append(event)
                done.set()

        first = next(iter(sorted(self.model.eos_ids)), 0) if self.model.eos_ids else 0
        self.submit(Request([first % self.model.vocab_size], sink, SamplingParams.make(temperature=0, seed=0),
                            max_tokens=3, ignore_eos=True))
        if not done.wait(timeout):
            raise MrsError(f"warm-up of {self.model.name} timed out after {timeout:.0f}s")
        if box and box[0].error is not None:
            raise box[0].error

    def preload(self) -> list[int]:
        """Take every prompt bucket's prefill the backend already has compiled (in the compile
        cache from an earlier run), so no first request after a restart waits on a compile.
        Compiles nothing; returns the buckets found. Backends without a store find none."""
        stored = getattr(self.steps, "stored_prefill_slot", None)
        found: list[int] = []
        if stored is None:
            return found
        width = MIN_PROMPT_BUCKET
        while True:
            with self._cond:
                have = width in self._prefills or width in self._compiling
            run = None if have else stored(width, self.cache)
            if run is not None:
                with self._cond:
                    self._prefills.setdefault(width, run)
                found.append(width)
            if width >= self.max_len:
                return found
            width = bucket(width + 1, MIN_PROMPT_BUCKET, self.max_len)

    # ----- the loop (batcher thread) -----------------------------------------------

    def _reset(self) -> None:
        """Fresh device state: cache, per-row sampling, history, next tokens."""
        B, S = self.slots, self.max_len
        self.cache = self.runner.new_cache(B, S)
        self.sampling_rows = SamplingParams.stack([SamplingParams.make(temperature=0, seed=0)] * B)
        self.sampling = self.steps.sampling(self.sampling_rows)
        self.history = self.steps.history(np.full((B, S), -1, np.int32))
        self.tokens = self.steps.tokens(np.zeros((B,), np.int32))
        self.step = np.zeros((B,), np.int32)
        self._inflight = None
        self.prefixes = SlotPrefixes(B, rewindable=self.runner.rewindable(self.cache), enabled=self.prefix_reuse)

    def _run(self) -> None:
        while True:
            with self._cond:
                # Idle only when no slot is taken: a finished or cancelled row still needs releasing.
                while not self._closing and not self._has_work():
                    self._cond.wait()
                if self._closing:
                    break
            try:
                self._iteration()
            except Exception as e:  # a failed step poisons the donated cache: fail all, start over
                log.exception("decode loop of %s failed", self.model.name)
                self._fail_all(MrsError(f"generation failed: {e}"))
                self._reset()
        self._fail_all(ServerBusyError(f"model {self.model.name} was unloaded; retry"))

    def _has_work(self) -> bool:
        """A slot is taken (even a finished row needs releasing), or a queued request can start."""
        if self._inflight is not None or any(r is not None for r in self._rows):
            return True
        free = self._free()
        return any(self._planned_width(r, *self.prefixes.plan(r.prompt_ids, free)) in self._prefills
                   for r in self._pending)

    def _iteration(self) -> None:
        if any(r is not None and r.live and r.row.constraint is not None for r in self._rows):
            # A constrained row's next mask depends on the token in flight: read it first.
            if self._inflight is not None:
                self._deliver(*self._inflight)
            dispatched = self._dispatch_decode()
        else:
            dispatched = self._dispatch_decode()
            if self._inflight is not None:
                self._deliver(*self._inflight)
        self._inflight = dispatched
        self._release()
        for slot, request, reuse in self._admit():
            self._prefill(slot, request, reuse)

    def _dispatch_decode(self):
        live = [(i, r) for i, r in enumerate(self._rows) if r is not None and r.live]
        if not live:
            return None
        active = np.zeros((self.slots,), bool)
        for i, r in live:
            active[i] = True
            self.step[i] += 1
            r.fed += 1
        allowed = allowed_rows(self.model.vocab_size, [r.row if r is not None and r.live else None for r in self._rows])
        result, self.cache, self.history = self.steps.decode(
            self.cache, self.tokens, self.sampling, self.history, self.step.copy(), active, allowed)
        self.tokens = result.tokens
        return result, live

    def _deliver(self, result, rows: list[tuple[int, _Active]]) -> None:
        want_top = any(r.request.logprobs for _, r in rows)
        tokens, logprobs, top_ids, top_lps = result.read(top=want_top)
        for i, active in rows:
            if active.live:
                top = (top_ids[i], top_lps[i]) if want_top else None
                self._take(active, int(tokens[i]), float(logprobs[i]), top)

    def _take(self, active: _Active, token: int, logprob: float, top) -> None:
        request, row = active.request, active.row
        now = time.perf_counter()
        if not active.first_token_at:
            active.first_token_at = now
        is_eos = token in row.eos
        active.sampled.append(token)
        piece = row.add(token, logprob)
        if not is_eos:
            self.tokens_total += 1
            active.pending_ids.append(token)
            if request.logprobs:
                k = request.top_logprobs
                alternatives = [(int(a), float(b)) for a, b in zip(top[0][:k], top[1][:k], strict=True)] if k else []
                active.pending.append(TokenLogprob(token, logprob, alternatives))
        if row.finish:
            active.finished = True
            done = Completion(text=row.text, token_ids=row.ids, finish_reason=row.finish,
                              prompt_tokens=row.prompt_len, completion_tokens=len(row.ids),
                              prompt_seconds=active.first_token_at - active.admitted_at,
                              decode_seconds=now - active.first_token_at, logprobs=row.logprobs,
                              cached_tokens=active.reused)
            self._emit(active, Event(piece, active.pending, active.pending_ids, done=done))
            active.pending, active.pending_ids = [], []
        elif piece:
            self._emit(active, Event(piece, active.pending, active.pending_ids))
            active.pending, active.pending_ids = [], []

    def _emit(self, active: _Active, event: Event) -> None:
        event.queued_seconds = active.admitted_at - active.request.submitted_at
        try:
            active.request.sink(event)
        except Exception:  # the receiver is gone (closed event loop): stop this request
            log.debug("sink of a request failed; cancelling it", exc_info=True)
            active.request.cancelled = True

    def _release(self) -> None:
        with self._cond:
            for i, active in enumerate(self._rows):
                if active is not None and not active.live:
                    self._rows[i] = None
                    self.prefixes.release(i, active.request.prompt_ids, active.sampled, active.fed)

    def _free(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is None]

    def _planned_width(self, request: Request, slot: int, reuse: int) -> int:
        request.width = bucket(len(request.prompt_ids) - reuse, MIN_PROMPT_BUCKET, self.max_len)
        return request.width

    def _admit(self) -> list[tuple[int, Request, int]]:
        """Free slots for queued requests, oldest first among those whose prefill is compiled:
        (slot, request, reused tokens)."""
        admitted, waiting = [], []
        with self._cond:
            free = self._free()
            while free and self._pending:
                request = self._pending.popleft()
                if request.cancelled:
                    continue
                slot, reuse = self.prefixes.plan(request.prompt_ids, free)
                if self._prefill_for(self._planned_width(request, slot, reuse)) is None:
                    waiting.append(request)
                    continue
                free.remove(slot)
                self.prefixes.take(slot)
                admitted.append((slot, request, reuse))
            self._pending.extendleft(reversed(waiting))
        return admitted

    def _prefill_for(self, width: int) -> Any:
        """The compiled prefill for ``width`` tokens, or None while it compiles."""
        compiled = self._prefills.get(width)
        if compiled is None and width not in self._compiling:
            thread = threading.Thread(target=self._compile_prefill, args=(width,), daemon=True,
                                      name=f"mrs-compile[{self.model.name}:{width}]")
            self._compiling[width] = thread
            thread.start()
        return compiled

    def _compile_prefill(self, width: int) -> None:
        """Compile prefill_slot for prompts of ``width`` tokens (helper thread)."""
        try:
            compiled = self.steps.prefill_slot(width, self.cache)
        except Exception as e:  # reported to the requests that needed it
            log.exception("compiling prefill of %s for %d tokens failed", self.model.name, width)
            failed = e
            with self._cond:
                self._compiling.pop(width, None)
                victims = [r for r in self._pending if r.width == width]
                for r in victims:
                    self._pending.remove(r)
            for r in victims:
                try:
                    r.sink(Event(error=MrsError(f"compiling prefill failed: {failed}")))
                except Exception:  # one gone receiver must not keep the others waiting
                    log.debug("sink of a request failed", exc_info=True)
            return
        with self._cond:
            self._prefills[width] = compiled
            self._compiling.pop(width, None)
            self._cond.notify_all()

    def _prefill(self, slot: int, request: Request, reuse: int) -> None:
        """Prefill the request's tokens past the ``reuse`` its slot already holds."""
        ids = request.prompt_ids
        n, S, width = len(ids), self.max_len, request.width
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n - reuse] = ids[reuse:]
        positions = step_positions([reuse], [n - reuse], width)
        history = np.full((1, S), -1, np.int32)
        history[0, S - n:] = ids
        row = RowOutput(self.model, n, request.max_tokens, tuple(request.stop), request.ignore_eos,
                        request.constraint)
        active = _Active(request, row, time.perf_counter())
        active.reused = reuse
        self.reused_total += reuse
        result, self.cache = self._prefills[width](
            self.cache, tokens, positions, slot, request.sampling, history, np.zeros((1,), np.int32),
            allowed_rows(self.model.vocab_size, [row]))
        self.sampling_rows = self.sampling_rows.replace_row(slot, request.sampling)
        self.sampling = self.steps.sampling(self.sampling_rows)
        self.history = self.steps.put_row(self.history, slot, history)
        self.tokens = self.steps.put_row(self.tokens, slot, result.tokens)
        self.step[slot] = 0
        with self._cond:
            self._rows[slot] = active
        sampled = result.read(top=request.logprobs)
        top = (sampled.top_ids[0], sampled.top_logprobs[0]) if request.logprobs else None
        self._take(active, int(sampled.tokens[0]), float(sampled.logprobs[0]), top)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            victims = [r for r in self._rows if r is not None and r.live]
            victims += [_Active(q, None, time.perf_counter()) for q in self._pending if not q.cancelled]
            self._pending.clear()
            self._rows = [None] * self.slots
        for active in victims:
            active.finished = True
            self._emit(active, Event(error=error))
