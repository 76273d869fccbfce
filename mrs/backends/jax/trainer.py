"""The optax side of LoRA (the JAX backend's trainer): AdamW with warmup and cosine decay, gradient clipping and
accumulation, a jitted step that donates its optimizer state, and checkpoints to resume.

One ``Trainer`` compiles its step once per batch width (the data's length buckets,
mrs/train/data.py): rows are always ``batch_size``, so after the first batch of each
width nothing recompiles (``compiles`` counts them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mrs.backends.jax.lora import LoraModel
from mrs.errors import MrsError
from mrs.train.data import batch_arrays
from mrs.train.options import TrainOptions

CHECKPOINT = "checkpoint"


def schedule(options: TrainOptions) -> optax.Schedule:
    """The learning rate per update: linear warmup from 0, then cosine decay to a tenth of the peak."""
    warmup = min(options.warmup_steps, options.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, options.learning_rate, warmup, options.steps,
                                              end_value=options.learning_rate * 0.1)


def optimizer(options: TrainOptions) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on ``schedule``; with ``accumulate`` > 1,
    optax.MultiSteps averages that many micro-batches per update."""
    tx = optax.chain(optax.clip_by_global_norm(options.max_grad_norm),
                     optax.adamw(schedule(options), weight_decay=options.weight_decay))
    return optax.MultiSteps(tx, options.accumulate) if options.accumulate > 1 else tx


class Trainer:
    """Optimizer state and the jitted update for one ``LoraModel``."""

    def __init__(self, lora: LoraModel, options: TrainOptions):
        self.lora, self.options = lora, options
        self.tx = optimizer(options)
        # Committed to the model's device from the start, as the step's outputs are: else the
        # second step would compile again for the changed placement.
        device = lora.model.runner.device
        self.params = jax.device_put(lora.params, device)
        self.opt_state = jax.device_put(self.tx.init(self.params), device)
        self.micro_steps = 0
        self._key = jax.random.key(options.seed)
        self._update = jax.jit(self._update_step, donate_argnums=(0, 1))
        self._evaluate = jax.jit(self._eval_step)

    def _update_step(self, params, opt_state, frozen, batch, cache, key):
        (loss, _), grads = jax.value_and_grad(self.lora.loss, has_aux=True)(params, frozen, batch, cache, key)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        return optax.apply_updates(params, updates), opt_state, loss, norm

    def _eval_step(self, params, frozen, batch, cache):
        loss, weight = self.lora.loss(params, frozen, batch, cache)
        return loss * weight, weight

    def learning_rate(self, update: int) -> float:
        """The schedule's learning rate at optimizer update ``update`` (0-based)."""
        return float(schedule(self.options)(update))

    @property
    def compiles(self) -> int:
        """How many shapes the update step has compiled for."""
        return self._update._cache_size()

    def step(self, batch: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """One micro-batch: (its loss, its gradient norm). Every ``accumulate`` of them
        make one optimizer update."""
        key = jax.random.fold_in(self._key, self.micro_steps) if self.lora.settings.dropout > 0 else None
        cache = self.lora.empty_cache(batch["tokens"].shape[0])
        self.params, self.opt_state, loss, norm = self._update(self.params, self.opt_state, self.lora.frozen,
                                                               dict(batch), cache, key)
        self.micro_steps += 1
        return float(loss), float(norm)

    def evaluate(self, batches) -> float:
        """Mean loss per trained token over ``batches`` (no dropout)."""
        total = weight = 0.0
        for batch in batches:
            arrays = batch_arrays(batch, False)
            cache = self.lora.empty_cache(arrays["tokens"].shape[0])
            s, w = self._evaluate(self.params, self.lora.frozen, arrays, cache)
            total, weight = total + float(s), weight + float(w)
        return total / weight if weight else float("nan")

    # --- checkpoints ------------------------------------------------------------------

    def save(self, folder: Path, state: Mapping[str, Any]) -> None:
        """Params, optimizer state and ``state`` (JSON) into ``folder``/checkpoint, replaced
        whole: a crash mid-save leaves the previous checkpoint."""
        from safetensors.numpy import save_file

        leaves = {f"params/{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(self.params))}
        leaves.update({f"opt/{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(self.opt_state))})
        fresh = folder / f".{CHECKPOINT}.new"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        save_file(leaves, str(fresh / "state.safetensors"))
        meta = {**state, "micro_steps": self.micro_steps, "options": asdict(self.options)}
        (fresh / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        target, old = folder / CHECKPOINT, folder / f".{CHECKPOINT}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(fresh, target)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def find(folder: Path) -> Path | None:
        """The checkpoint in ``folder``, or the previous one a crash mid-save left aside."""
        for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
            if (folder / name / "trainer_state.json").is_file():
                return folder / name
        return None

    @staticmethod
    def state(checkpoint: Path) -> dict:
        """A checkpoint's JSON state (step, data position, what run saved it)."""
        return json.loads((checkpoint / "trainer_state.json").read_text())

    def restore(self, checkpoint: Path, meta: dict | None = None) -> dict:
        """Load a checkpoint ``save`` wrote for this set-up (its ``state``, if already read);
        returns that state."""
        from safetensors.numpy import load_file

        meta = meta if meta is not None else self.state(checkpoint)
        stored = load_file(str(checkpoint / "state.safetensors"))
        device = self.lora.model.runner.device

        def refill(tree: Any, prefix: str) -> Any:
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            if sum(k.startswith(prefix + "/") for k in stored) != len(leaves):
                raise MrsError(f"{checkpoint} was saved for another LoRA set-up; use another --out folder")
            new = []
            for i, leaf in enumerate(leaves):
                value = stored[f"{prefix}/{i}"]
                if value.shape != np.shape(leaf):
                    raise MrsError(f"{checkpoint} was saved for another LoRA set-up; use another --out folder")
                new.append(jax.device_put(np.asarray(value, dtype=np.asarray(leaf).dtype), device))
            return jax.tree_util.tree_unflatten(treedef, new)

        self.params = refill(self.params, "params")
        self.opt_state = refill(self.opt_state, "opt")
        self.micro_steps = int(meta.get("micro_steps", 0))
        return meta
