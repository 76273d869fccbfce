"""The fine-tuning commands of the CLI (``mrs finetune``, ``mrs merge``), mixed into
``mrs.cli.CLI``. Thin: they check flags and call mrs.train and mrs.merge."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from mrs.cli_args import UsageError, _int, _number, _text


class TrainCommands:
    def finetune(self, model: Any, data: Any, out: Any = None, steps: Any = 200, learning_rate: Any = 2e-4,
                 rank: Any = 8, alpha: Any = 16.0, dropout: Any = 0.0, targets: Any = None, batch_size: Any = 4,
                 accumulate: Any = 1, max_length: Any = 512, val: Any = None, val_fraction: Any = 0.0,
                 eval_every: Any = 50, save_every: Any = 100, warmup: Any = None, weight_decay: Any = 0.0,
                 max_grad_norm: Any = 1.0, seed: Any = 0, rslora: bool = False, pack: bool = False,
                 remat: bool = False, resume: bool = True):
        """Train a LoRA adapter (PEFT's format) on MODEL from DATA.jsonl; QLoRA with --quantize int4|int8.

        Each line of DATA is {"messages": [...]} (loss on the assistant turns), {"prompt": ..., "completion": ...}
        (loss on the completion) or {"text": ...}. OUT gets adapter_config.json, adapter_model.safetensors,
        train_log.jsonl, loss.png and checkpoint/; running the same command again resumes from it.
        Use the result with `mrs generate --model MODEL --adapter OUT`, or `mrs merge`.

        Args:
            model: the base model (name, folder or GGUF file).
            data: the training JSONL file.
            out: the adapter folder to write (required).
            steps: optimizer updates (default 200).
            learning_rate: peak AdamW learning rate, after warmup, cosine-decayed (default 2e-4).
            rank: LoRA rank r (default 8).
            alpha: LoRA alpha; the update is scaled by alpha / r (default 16).
            dropout: LoRA dropout on the adapted inputs (default 0).
            targets: modules to adapt by their checkpoint names, comma-separated (default: the attention
                and MLP projections; Mamba's in_proj and x_proj).
            batch_size: rows per micro-batch (default 4).
            accumulate: micro-batches per update (gradient accumulation, default 1).
            max_length: tokens per example; longer ones are cut (default 512).
            val: a validation JSONL file.
            val_fraction: hold out this share of DATA for validation when there is no --val (default 0).
            eval_every: validate every N updates (default 50).
            save_every: checkpoint every N updates (default 100).
            warmup: warmup updates (default: a tenth of --steps, at most 100).
            weight_decay: AdamW weight decay (default 0).
            max_grad_norm: clip gradients to this global norm (default 1).
            seed: seed for LoRA's init, dropout and the data order (default 0).
            rslora: scale by alpha / sqrt(r) (rank-stabilized LoRA).
            pack: pack several examples into each row (each attends to the earlier ones in its row).
            remat: recompute each layer's activations in the backward pass (less memory, slower).
            resume: continue from OUT's checkpoint when there is one (default); --noresume refuses to.
        """
        import mrs.train
        from mrs.adapters import LoraSettings

        if out is None:
            raise UsageError("--out is required: the folder the adapter is written to")
        data_path = Path(_text(data, "DATA")).expanduser()
        if not data_path.is_file():
            raise UsageError(f"no data file {data_path}")
        names: Any = ()
        if targets is not None:
            names = tuple(t.strip() for t in (",".join(targets) if isinstance(targets, (list, tuple))
                                               else _text(targets, "--targets")).split(",") if t.strip())
        settings = LoraSettings(rank=_int(rank, "--rank", 1), alpha=_number(alpha, "--alpha"),
                                dropout=_number(dropout, "--dropout"), targets=names, rslora=bool(rslora))
        options = mrs.train.TrainOptions(
            steps=_int(steps, "--steps", 1), learning_rate=_number(learning_rate, "--learning-rate"),
            batch_size=_int(batch_size, "--batch-size", 1), accumulate=_int(accumulate, "--accumulate", 1),
            max_length=_int(max_length, "--max-length", 2), eval_every=_int(eval_every, "--eval-every", 1),
            save_every=_int(save_every, "--save-every", 1),
            warmup=None if warmup is None else _int(warmup, "--warmup", 0),
            weight_decay=_number(weight_decay, "--weight-decay"), max_grad_norm=_number(max_grad_norm,
                                                                                        "--max-grad-norm"),
            seed=_int(seed, "--seed"), pack=bool(pack), remat=bool(remat))
        loaded = self._load(_text(model, "MODEL"))
        settings = dataclasses.replace(settings, base_model=loaded.name)
        with _progress(options.steps) as report:
            result = mrs.train.finetune(loaded, data_path, out=Path(_text(out, "--out")).expanduser(),
                                        settings=settings, options=options,
                                        val=None if val is None else Path(_text(val, "--val")).expanduser(),
                                        val_fraction=_number(val_fraction, "--val-fraction", low=0.0),
                                        resume=bool(resume), on_progress=report)
        held = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"trained {result.lora.trainable_count:,} LoRA parameters for {result.steps} updates: "
              f"loss {result.train_loss:.4f}{held}, {result.tokens_per_second:,.0f} tokens/s; adapter in {result.out}")

    def merge(self, model: Any, adapter: Any, out: Any = None):
        """Fold a LoRA adapter into a safetensors model and write the merged model.

        Args:
            model: the base model (name or folder, safetensors).
            adapter: the adapter folder (PEFT's format, e.g. from `mrs finetune`).
            out: the new model's name (org/model, in the models directory) or a folder path (required).
        """
        from mrs import adapters, store
        from mrs.merge import write_merged

        if out is None:
            raise UsageError("--out is required: the new model's name or folder")
        home = self._settings().home
        source = store.resolve(_text(model, "MODEL"), home)
        lora = adapters.read(Path(_text(adapter, "ADAPTER")).expanduser())
        dst = _text(out, "--out")
        target = Path(dst).expanduser() if store.looks_like_path(dst) else store.model_dir(home, dst)
        merged = write_merged(source, lora, target)
        print(f"merged the adapter into {merged} modules of {source.name}: {target}")


class _progress:
    """A rich progress bar on stderr (loss, tokens/s, ETA), or a line per 10% off a terminal."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.live = console.is_terminal
        if self.live:
            self.bar = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                                TextColumn("val {task.fields[val]}"), TimeRemainingColumn(), console=console)
            self.bar.__enter__()
            self.task = self.bar.add_task("finetune", total=self.total, loss="-", rate="-", val="-")
        self.val = "-"
        return self.report

    def report(self, p: Any) -> None:
        if p.val_loss is not None:
            self.val = f"{p.val_loss:.4f}"
        if self.live:
            self.bar.update(self.task, completed=p.step, loss=f"{p.loss:.4f}", rate=f"{p.tokens_per_second:,.0f}",
                            val=self.val)
        elif p.step == p.steps or p.step % max(1, p.steps // 10) == 0:
            print(f"update {p.step}/{p.steps}: loss {p.loss:.4f}, {p.tokens_per_second:,.0f} tokens/s, "
                  f"validation {self.val}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.live:
            self.bar.__exit__(*exc)
        return False
