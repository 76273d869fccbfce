"""How a fine-tuning run trains: the options of ``mrs finetune`` and ``mrs.train.lora``
(backend-free; the JAX backend's trainer, mrs/backends/jax/trainer.py, reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from mrs.errors import InvalidParameterError


@dataclass(frozen=True)
class TrainOptions:
    """How a fine-tuning run trains (``mrs finetune``'s flags)."""

    steps: int = 200                # optimizer updates
    learning_rate: float = 2e-4
    warmup: int | None = None       # None: a tenth of the steps, at most 100
    batch_size: int = 4             # rows per micro-batch
    accumulate: int = 1             # micro-batches per update
    max_length: int = 512
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100
    pack: bool = False
    remat: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate", "max_length", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(name, value, "a positive integer")
        if self.max_length < 2:
            raise InvalidParameterError("max_length", self.max_length, "at least 2")
        if self.warmup is not None and (not isinstance(self.warmup, int) or self.warmup < 0):
            raise InvalidParameterError("warmup", self.warmup, "a non-negative integer")
        for name, low in (("learning_rate", 0.0), ("max_grad_norm", 0.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > low:
                raise InvalidParameterError(name, value, "a positive number")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise InvalidParameterError("weight_decay", self.weight_decay, "a non-negative number")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)
