"""Model families as data, shared by every backend and by every checkpoint reader.

A family module holds a frozen config dataclass built from the HF config.json
(``from_hf``, unknown keys ignored, unsupported values refused) and the checkpoint map:
``ignored(name)`` for tensors that are buffers rather than weights, and where names or
layouts differ ``rename(name, array)`` (or ``renamer(config)``, when it depends on the
config) and ``fused(config)`` (checkpoint tensors stacked into one model tensor). The
array code of each family lives with each backend (``mrs/archs`` for JAX).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from mrs.errors import UnsupportedModelError
from mrs.families import bert, gemma, llama, mamba, phi
from mrs.weights import Fused

Rename = Callable[[str, np.ndarray], Iterator[tuple[str, np.ndarray]]]


@dataclass(frozen=True)
class CheckpointMap:
    """How checkpoint tensors become model tensors (see ``mrs.weights.load_params``)."""

    ignored: Callable[[str], bool] = lambda name: False
    rename: Rename | None = None
    fused: Mapping[str, Fused] = field(default_factory=dict)
    whole: frozenset[str] = frozenset()     # fused model tensors the checkpoint keeps as one module


@dataclass(frozen=True)
class Family:
    """One model_type: its module (config + checkpoint map), config class and kind."""

    name: str
    module: ModuleType
    config_cls: Any
    kind: str = "causal"          # "causal" generates text; "encoder" embeds

    def checkpoint_map(self, config: Any) -> CheckpointMap:
        m = self.module
        rename = m.renamer(config) if hasattr(m, "renamer") else getattr(m, "rename", None)
        return CheckpointMap(ignored=getattr(m, "ignored", lambda name: False), rename=rename,
                             fused=m.fused(config) if hasattr(m, "fused") else {},
                             whole=frozenset(m.whole(config)) if hasattr(m, "whole") else frozenset())

    def lora_targets(self) -> tuple[str, ...] | None:
        """The checkpoint modules LoRA adapts by default, where the family names them
        (None: every projection inside the layers)."""
        return getattr(self.module, "LORA_TARGETS", None)


FAMILIES: dict[str, Family] = {model_type: Family(model_type, llama, llama.LlamaConfig)
                               for model_type in llama.MODEL_TYPES}
FAMILIES["phi"] = Family("phi", phi, phi.PhiConfig)
FAMILIES["phi3"] = Family("phi3", phi, phi.PhiConfig)
FAMILIES["mamba"] = Family("mamba", mamba, mamba.MambaConfig)
FAMILIES.update({model_type: Family(model_type, gemma, gemma.GemmaConfig) for model_type in gemma.MODEL_TYPES})
FAMILIES["bert"] = Family("bert", bert, bert.BertConfig, kind="encoder")


def register(family: Family) -> None:
    """Add a family (for users experimenting, and for tests of a new backend)."""
    FAMILIES[family.name] = family


def resolve(hf_config: dict) -> tuple[Family, Any]:
    """Pick the family for a config.json dict and parse its config."""
    model_type = hf_config.get("model_type")
    if not model_type:
        raise UnsupportedModelError("config.json has no model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    family = FAMILIES[model_type]
    return family, family.config_cls.from_hf(hf_config)
