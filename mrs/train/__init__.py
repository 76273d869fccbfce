"""Fine-tuning: LoRA and QLoRA with optax, adapters in Hugging Face PEFT's format.

    import mrs, mrs.train
    model = mrs.load("org/model")                     # quantize="int4" for QLoRA
    result = mrs.train.lora(model, "data.jsonl", out="adapter", steps=200, rank=8)
    tuned = mrs.load("org/model", adapter="adapter")

This package is backend-free: the data (``mrs.train.data``: JSONL to batches), the options
and the run loop. The array side is the JAX backend's (``LoraModel``: the split into
trainable factors and a frozen base, and its pure ``loss``, which research code may
replace; ``Trainer``: the jitted optax update), reached here by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrs.adapters import LoraSettings
from mrs.train.options import TrainOptions
from mrs.train.run import Progress, Result, finetune

__all__ = ["LoraModel", "LoraSettings", "Progress", "Result", "TrainOptions", "Trainer", "finetune", "lora"]


# The JAX backend's classes, imported by name on first use (as mrs.backends does), so that
# importing mrs.train costs no jax and the package stays above the backend seam.
_JAX_CLASSES = {"LoraModel": "mrs.backends.jax.lora", "Trainer": "mrs.backends.jax.trainer"}


def __getattr__(name: str) -> Any:
    if name in _JAX_CLASSES:
        import importlib

        return getattr(importlib.import_module(_JAX_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora(model: Any, train: str | Path, *, out: str | Path | None = None, rank: int = 8, alpha: float = 16.0,
         dropout: float = 0.0, targets: tuple[str, ...] | str = (), rslora: bool = False,
         val: str | Path | None = None, val_fraction: float = 0.0, **options: Any) -> Result:
    """Train a LoRA adapter on ``model`` (an mrs.Model, or a reference ``mrs.load`` takes)
    from a JSONL file; ``options`` are TrainOptions' fields (steps, learning_rate, ...)."""
    if not hasattr(model, "runner"):
        import mrs

        model = mrs.load(model)
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora,
                            base_model=getattr(model, "name", None))
    return finetune(model, train, out=out, settings=settings, options=TrainOptions(**options), val=val,
                    val_fraction=val_fraction)
