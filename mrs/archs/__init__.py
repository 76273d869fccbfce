"""Registry: a HF config.json -> (config dataclass, Flax model class).

Each family module provides a frozen config with ``from_hf(dict)``, an NNX model
whose parameter names mirror the HF checkpoint, and ``ignored(name)`` for
checkpoint tensors that are buffers rather than weights. Where names differ, the
module says how: ``rename(name, array)`` maps one checkpoint tensor to model
tensors, and ``fused(config)`` names checkpoint tensors stacked into one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mrs.archs import bert, llama, mamba, phi
from mrs.errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """How to build one family: its config class, model class and kind."""

    name: str
    module: ModuleType
    config_cls: Any
    model_cls: Any
    kind: str = "causal"          # "causal" generates text; "encoder" embeds


ARCHITECTURES: dict[str, Architecture] = {
    model_type: Architecture(model_type, llama, llama.LlamaConfig, llama.LlamaForCausalLM)
    for model_type in llama.MODEL_TYPES
}
ARCHITECTURES["phi"] = Architecture("phi", phi, phi.PhiConfig, phi.PhiForCausalLM)
ARCHITECTURES["phi3"] = Architecture("phi3", phi, phi.PhiConfig, phi.Phi3ForCausalLM)
ARCHITECTURES["mamba"] = Architecture("mamba", mamba, mamba.MambaConfig, mamba.MambaForCausalLM)
ARCHITECTURES["bert"] = Architecture("bert", bert, bert.BertConfig, bert.BertModel, kind="encoder")


def register(model_type: str, arch: Architecture) -> None:
    """Add a family (used by the family modules and by users experimenting)."""
    ARCHITECTURES[model_type] = arch


def resolve(hf_config: dict) -> tuple[Architecture, Any]:
    """Pick the architecture for a config.json dict and parse its config."""
    model_type = hf_config.get("model_type")
    if not model_type:
        raise UnsupportedModelError("config.json has no model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    arch = ARCHITECTURES[model_type]
    return arch, arch.config_cls.from_hf(hf_config)
