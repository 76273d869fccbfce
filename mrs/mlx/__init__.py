"""The MLX (mlx.nn) model class of each family: the mirror of mrs/archs, on the same
backend-free configs and checkpoint maps (mrs/families). A family's module is imported
when a model of it first loads."""

from __future__ import annotations

import importlib
from typing import Any

from mrs.errors import UnsupportedModelError
from mrs.families import bert, gemma, llama, mamba, phi

# model_type -> (module, class)
MODELS: dict[str, tuple[str, str] | Any] = {
    **{model_type: ("mrs.mlx.llama", "LlamaForCausalLM") for model_type in llama.MODEL_TYPES},
    **{model_type: ("mrs.mlx.gemma", "GemmaForCausalLM") for model_type in gemma.MODEL_TYPES},
    "phi": ("mrs.mlx.phi", "PhiForCausalLM"),
    "phi3": ("mrs.mlx.phi", "Phi3ForCausalLM"),
    **{model_type: ("mrs.mlx.mamba", "MambaForCausalLM") for model_type in mamba.MODEL_TYPES},
    **{model_type: ("mrs.mlx.bert", "BertModel") for model_type in bert.MODEL_TYPES},
}


def register(model_type: str, model_cls: Any) -> None:
    """Add the MLX model of a family registered with ``mrs.families.register``."""
    MODELS[model_type] = model_cls


def model_class(family_name: str) -> Any:
    """The MLX model class of a family, or a clear error if MLX has none."""
    if family_name not in MODELS:
        raise UnsupportedModelError(f"model_type {family_name!r} has no MLX model (have: {', '.join(sorted(MODELS))})")
    found = MODELS[family_name]
    if isinstance(found, tuple):
        module, name = found
        found = MODELS[family_name] = getattr(importlib.import_module(module), name)
    return found
