"""LoRA adapters in Hugging Face PEFT's format, and where they sit in mrs's projections.

Backend-free (numpy). An adapter folder is what PEFT's ``save_pretrained`` writes:
``adapter_config.json`` and ``adapter_model.safetensors`` with, per adapted module,
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
under the checkpoint's own module names (``model.layers.0.self_attn.q_proj``). The
update is W + scale * B A, scale = alpha / r (alpha / sqrt(r) with rsLoRA).

mrs fuses some checkpoint modules into one projection (q/k/v into ``qkv_proj``
[K, G + 2, H, D], gate/up into ``gate_up_proj``; ``mrs.weights.Fused``). A ``Piece``
says where one checkpoint module's rows sit in such a projection, so a LoRA layer can
keep one (A, B) per checkpoint module and an adapter moves between mrs and PEFT as it is.
Phi-3's checkpoint keeps q/k/v (and gate/up) as one module: there one piece covers the
whole projection and its B rows are regrouped per head.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from mrs.errors import MrsError
from mrs.weights import module_prefix

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(MrsError):
    """An adapter folder is missing, malformed, or does not fit the model."""


# --- settings (adapter_config.json) ----------------------------------------------------

# PEFT options that change the update in ways mrs does not run: refused, never ignored.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
                "rank_pattern": {}, "alpha_pattern": {}, "use_qalora": False, "target_parameters": None,
                "trainable_token_indices": None}


@dataclass(frozen=True)
class LoraSettings:
    """What an adapter_config.json says about the update (PEFT's LoraConfig fields)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ()     # PEFT's target_modules: names (suffix match) or one regex
    rslora: bool = False
    base_model: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, not {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise AdapterError(f"LoRA alpha must be a positive number, not {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def targets_module(self, module: str) -> bool:
        """PEFT's rule: a list names modules by their last components, a string is a regex
        matched against the whole name."""
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.targets)

    def to_peft(self) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets if isinstance(self.targets, str) else sorted(self.targets),
                "use_rslora": self.rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
                "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}

    @classmethod
    def from_peft(cls, config: dict, where: str = CONFIG_FILE) -> LoraSettings:
        if not isinstance(config, dict):
            raise AdapterError(f"{where}: not a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
        for key, plain in _UNSUPPORTED.items():
            value = config.get(key)
            if value is not None and value != plain and value not in ({}, []):
                raise AdapterError(f"{where}: {key}={value!r} is not supported by mrs (only plain LoRA)")
        targets = config.get("target_modules") or ()
        if not isinstance(targets, str):
            if not all(isinstance(t, str) for t in targets):
                raise AdapterError(f"{where}: target_modules must be names or a regex")
            targets = tuple(targets)
        try:
            return cls(rank=config.get("r", 8), alpha=float(config.get("lora_alpha", 8)),
                       dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
                       rslora=bool(config.get("use_rslora", False)),
                       base_model=config.get("base_model_name_or_path"))
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{where}: {e}") from e


@dataclass
class Adapter:
    """One adapter: its settings and, per checkpoint module, A [r, in] and B [out, r]."""

    settings: LoraSettings
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def delta(self, module: str) -> np.ndarray:
        """scale * B A [out, in] in float32: what the adapter adds to ``module``'s weight."""
        a, b = self.weights[module]
        return self.settings.scale * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))


def read(folder: Path | str) -> Adapter:
    """An adapter folder (PEFT's layout), checked: every module has A and B of one rank."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_FILE}: is it a LoRA adapter folder (PEFT's save_pretrained)?")
    if not weights_path.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (it has {', '.join(found)}; mrs reads safetensors only)" if found else ""
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        settings = LoraSettings.from_peft(json.loads(config_path.read_text()), str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from e
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read {weights_path}: {e}") from e
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        found = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if found is None:
            raise AdapterError(f"{weights_path.name}: tensor {key} is not a LoRA A or B weight")
        parts.setdefault(found.group(1), {})[found.group(2)] = value
    weights = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_path.name}: module {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != settings.rank or b.shape[1] != settings.rank:
            raise AdapterError(f"{weights_path.name}: module {module} has A {a.shape} and B {b.shape}; "
                               f"rank {settings.rank} needs A [{settings.rank}, in] and B [out, {settings.rank}]")
        weights[module] = (a, b)
    if not weights:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    return Adapter(settings, weights)


def write(folder: Path | str, adapter: Adapter) -> Path:
    """Write ``adapter`` in PEFT's layout; each file appears whole or not at all."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    write_whole(folder / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config = json.dumps(adapter.settings.to_peft(), indent=2) + "\n"
    write_whole(folder / CONFIG_FILE, lambda path: Path(path).write_text(config))
    return folder


def write_whole(target: Path, write_to: Any) -> None:
    """Call ``write_to(temporary path)`` beside ``target``, then rename it into place: a reader
    sees the old file or the new one, never half of one. The file gets the usual permissions
    (0666 less the umask), not mkstemp's private 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write_to(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- where a checkpoint module sits in mrs's projections -------------------------------

@dataclass(frozen=True)
class Piece:
    """One checkpoint module's share of an mrs projection with outputs ``out``.

    ``axis`` is the fused output axis; the piece holds [start, stop) of it (the whole
    output when ``axis`` is None). B, as mrs keeps it, is [*lead, r]: the piece's own
    output shape. ``stacked`` lists the leads of the parts a checkpoint stores as one
    module (Phi-3's qkv_proj): its B rows are those parts one after another.
    """

    module: str
    lead: tuple[int, ...]
    axis: int | None = None
    start: int = 0
    stop: int = 0
    stacked: tuple[tuple[int, ...], ...] = ()
    stacked_axis: int = 0

    @property
    def rows(self) -> int:
        return prod(self.lead)

    def to_model(self, b: np.ndarray) -> np.ndarray:
        """B [rows, r] as the checkpoint keeps it -> [*lead, r]."""
        r = b.shape[-1]
        if not self.stacked:
            return b.reshape(self.lead + (r,))
        cuts = np.cumsum([prod(p) for p in self.stacked])[:-1]
        parts = [part.reshape(tuple(lead) + (r,)) for part, lead in zip(np.split(b, cuts), self.stacked, strict=True)]
        return np.concatenate(parts, axis=self.stacked_axis)

    def to_checkpoint(self, b: np.ndarray) -> np.ndarray:
        """B [*lead, r] -> [rows, r], the inverse of ``to_model``."""
        r = b.shape[-1]
        if not self.stacked:
            return b.reshape(-1, r)
        cuts = np.cumsum([p[self.stacked_axis] for p in self.stacked])[:-1]
        return np.concatenate([part.reshape(-1, r) for part in np.split(b, cuts, axis=self.stacked_axis)])


def pieces(fused: Mapping[str, Any], whole: Iterable[str], path: str, out: tuple[int, ...]) -> list[Piece]:
    """The checkpoint modules inside the mrs projection ``path`` with outputs ``out``.

    ``fused`` is the family's ``CheckpointMap.fused``; ``whole`` names the fused
    projections a checkpoint keeps as one module (Phi-3)."""
    whole = set(whole)
    for target, spec in fused.items():
        prefix = module_prefix(path, target)
        if prefix is None:
            continue
        leads = tuple(tuple(lead) for _, lead in spec.parts)
        if target in whole:
            return [Piece(path, tuple(out), stacked=leads, stacked_axis=spec.axis)]
        found, start = [], 0
        for (part, lead) in spec.parts:
            stop = start + lead[spec.axis]
            found.append(Piece(prefix + part, tuple(lead), spec.axis, start, stop))
            start = stop
        return found
    return [Piece(path, tuple(out))]


# --- merging into a checkpoint as it is read -------------------------------------------

def merged(stream: Iterable[tuple[str, Any]], adapter: Adapter,
           rename: Callable[[str, Any], Iterable[tuple[str, Any]]] | None = None) -> Iterator[tuple[str, Any]]:
    """The checkpoint ``stream`` with each adapted module's weight replaced by W + scale B A
    (in float32, then the checkpoint's dtype). Every module the adapter names must be met,
    with the shape B A has. Modules are matched by the checkpoint's own names, or by the
    names the family's ``rename`` gives them (a Gemma 3 cut from its multimodal model stores
    ``language_model.model.*``; adapters name ``model.*``, as mrs and transformers do)."""
    pending = set(adapter.weights)
    for name, value in stream:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and pending and module not in pending and rename is not None:
            renamed = list(rename(name, value))
            if len(renamed) == 1 and renamed[0][1] is value:
                module = renamed[0][0].rpartition(".")[0]
        if leaf == "weight" and module in pending:
            if not isinstance(value, np.ndarray) or value.dtype.kind in "iub":
                raise AdapterError(f"the adapter changes {module}, but its weight is stored packed; "
                                   "load the model dequantized to apply it")
            delta = adapter.delta(module)
            if value.shape != delta.shape:
                raise AdapterError(f"the adapter's {module} is {delta.shape[0]}x{delta.shape[1]}, but the model's "
                                   f"weight is {'x'.join(map(str, value.shape))}: is it for another base model?")
            value = (np.asarray(value, np.float32) + delta).astype(value.dtype)
            pending.discard(module)
        yield name, value
    if pending:
        names = sorted(pending)
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        raise AdapterError(f"the adapter changes modules this model does not have: {', '.join(names[:3])}{more}"
                           " — is it for another base model?")
