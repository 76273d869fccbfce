"""One fine-tuning run, from a model and a JSONL file to an adapter folder.

``finetune`` reads the data (mrs/train/data.py), has the model's backend set up LoRA and
the optimizer (for JAX: mrs/backends/jax/lora.py and trainer.py), trains for
``options.steps`` updates with validation every ``eval_every`` and a checkpoint every
``save_every``, and leaves in ``out``: the adapter
in PEFT's format, ``train_log.jsonl`` (one line per update and per validation),
``loss.png`` and ``checkpoint/``. Run again with the same ``out`` and it resumes from
the checkpoint, with the same batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mrs import adapters, backends
from mrs.adapters import LoraSettings
from mrs.errors import MrsError
from mrs.train import data
from mrs.train.data import batch_arrays
from mrs.train.options import TrainOptions

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class Progress:
    """What a run reports after each update (the CLI draws it)."""

    step: int
    steps: int
    loss: float
    tokens_per_second: float
    learning_rate: float
    val_loss: float | None = None


@dataclass
class Result:
    """What a run did: where the adapter is, and how training went."""

    out: Path | None
    lora: Any           # the backend's LoraModel (mrs/backends/jax/lora.py)
    trainer: Any        # its Trainer
    steps: int
    train_loss: float
    val_loss: float | None
    tokens_per_second: float
    compiles: int
    history: list[dict] = field(default_factory=list)


def finetune(model: Any, train: str | Path, *, out: str | Path | None = None,
             settings: LoraSettings | None = None, options: TrainOptions | None = None,
             val: str | Path | None = None, val_fraction: float = 0.0, resume: bool = True,
             on_progress: Callable[[Progress], None] | None = None) -> Result:
    """Train a LoRA adapter on ``model`` (an mrs.Model on JAX; quantized for QLoRA) from the
    JSONL file ``train``; validation from ``val`` or a ``val_fraction`` of ``train``."""
    settings, options = settings or LoraSettings(), options or TrainOptions()
    if model.tokenizer is None:
        raise MrsError(f"{model.name} has no tokenizer: fine-tuning needs one to read the data")
    examples = data.read_examples(train, model.tokenizer, options.max_length)
    if val is not None:
        held = data.read_examples(val, model.tokenizer, options.max_length)
    else:
        examples, held = data.split_validation(examples, val_fraction, options.seed)
    if not examples:
        raise data.DataError(f"{train} has no example to train on")
    backend = backends.backend(model.runner.backend)
    if not hasattr(backend, "lora_model"):
        raise MrsError(f"fine-tuning needs a backend with autodiff (JAX); {model.name} runs on "
                       f"{model.runner.backend} — load it with --device cpu (or gpu)")
    lora = backend.lora_model(model, settings, seed=options.seed, remat=options.remat)
    trainer = backend.lora_trainer(lora, options)
    batches = data.Batches(examples, options.batch_size, options.max_length, seed=options.seed, pack=options.pack)
    out = Path(out) if out is not None else None
    history: list[dict] = []
    start = 0
    # What a checkpoint must have been saved by to be resumed: the same base, LoRA set-up,
    # data (by content) and options; the schedule depends on --steps, so it is one of them.
    identity = {"base": str(model.path), "adapter": lora.settings.to_peft(), "train": _digest(train),
                "val": _digest(val) if val is not None else val_fraction}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        found = trainer.find(out)
        if found is None and any((out / name).exists() for name in (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE)):
            raise MrsError(f"{out} already holds an adapter that no checkpoint of this run wrote; "
                           "choose another --out folder")
        if found is not None:
            if not resume:
                raise MrsError(f"{out} holds a run's checkpoint; resume it, or choose another --out folder")
            meta = trainer.state(found)
            if meta.get("identity") != identity or meta.get("options") != asdict(options):
                raise MrsError(f"{out} holds a checkpoint of another run (other model, data, LoRA or training "
                               "options, --steps included, which shapes the schedule); choose another --out folder")
            trainer.restore(found, meta)
            batches.restore(meta["data"])
            start, history = int(meta["step"]), _read_log(out)[: int(meta["log_lines"])]
            log.info("resuming %s at update %d of %d", out, start, options.steps)

    def save(step: int) -> None:
        if out is None:
            return
        adapters.write(out, lora.adapter(trainer.params))
        _write_log(out, history)
        trainer.save(out, {"step": step, "data": batches.state(), "identity": identity, "log_lines": len(history)})
        plot_loss(history, out / PLOT_FILE)

    tokens = 0
    began = time.perf_counter()
    last_loss = history[-1]["loss"] if history else float("nan")      # a finished run, run again
    val_loss = next((e["val_loss"] for e in reversed(history) if "val_loss" in e), None)
    for step in range(start, options.steps):
        losses, norms = [], []
        for _ in range(options.accumulate):
            batch = next(batches)
            arrays = batch_arrays(batch, options.pack)
            loss, norm = trainer.step(arrays)
            losses.append(loss)
            norms.append(norm)
            tokens += int((batch.positions >= 0).sum())
        last_loss = sum(losses) / len(losses)          # the update's micro-batches, each its own mean
        done = step + 1
        entry = {"step": done, "loss": last_loss, "grad_norm": sum(norms) / len(norms),   # before clipping
                 "learning_rate": trainer.learning_rate(step)}
        if held and (done % options.eval_every == 0 or done == options.steps):
            val_loss = trainer.evaluate(data.batches_once(held, options.batch_size, options.max_length))
            entry["val_loss"] = val_loss
        history.append(entry)
        rate = tokens / max(time.perf_counter() - began, 1e-9)
        if on_progress is not None:
            on_progress(Progress(done, options.steps, last_loss, rate, entry["learning_rate"], entry.get("val_loss")))
        if done % options.save_every == 0 or done == options.steps:
            save(done)
    elapsed = time.perf_counter() - began
    lora.params = trainer.params        # the trained factors: result.lora.adapter() is what was saved
    return Result(out, lora, trainer, options.steps, last_loss, val_loss, tokens / max(elapsed, 1e-9),
                  trainer.compiles, history)


def _digest(path: str | Path) -> str:
    """A data file's SHA-256: a resumed run must read the same examples."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_log(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(entry) + "\n" for entry in history)
    adapters.write_whole(out / LOG_FILE, lambda path: Path(path).write_text(text))


def _read_log(out: Path) -> list[dict]:
    path = out / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(history: list[dict], path: Path) -> bool:
    """The loss curve (training per update, validation where measured) as a PNG; False
    (logged once) where matplotlib is not installed (``pip install 'mrs[train]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_loss, "warned", False):
            log.warning("matplotlib is not installed, so no %s is drawn (pip install 'mrs[train]'); "
                        "the losses are in %s", PLOT_FILE, LOG_FILE)
            plot_loss.warned = True
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([e["step"] for e in history], [e["loss"] for e in history], label="train", linewidth=1)
    held = [e for e in history if e.get("val_loss") is not None]
    if held:
        ax.plot([e["step"] for e in held], [e["val_loss"] for e in held], "o-", label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    adapters.write_whole(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
