"""The JAX (Flax NNX) model class of each family (configs and checkpoint maps are
backend-free, in mrs/families)."""

from __future__ import annotations

from typing import Any

from mrs.archs import bert, gemma, llama, mamba, phi
from mrs.errors import UnsupportedModelError

MODELS: dict[str, Any] = {model_type: llama.LlamaForCausalLM for model_type in llama.MODEL_TYPES}
MODELS["phi"] = phi.PhiForCausalLM
MODELS["phi3"] = phi.Phi3ForCausalLM
MODELS["mamba"] = mamba.MambaForCausalLM
MODELS.update({model_type: gemma.GemmaForCausalLM for model_type in gemma.MODEL_TYPES})
MODELS["bert"] = bert.BertModel


def register(model_type: str, model_cls: Any) -> None:
    """Add the Flax model of a family registered with ``mrs.families.register``."""
    MODELS[model_type] = model_cls


def model_class(family_name: str) -> Any:
    """The Flax model class of a family, or a clear error if JAX has none."""
    if family_name not in MODELS:
        raise UnsupportedModelError(f"model_type {family_name!r} has no JAX model (have: {', '.join(sorted(MODELS))})")
    return MODELS[family_name]
