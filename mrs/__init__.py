"""mrs: run, serve, inspect and change open LLMs from one hackable JAX/Flax codebase.

    import mrs
    model = mrs.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    print(mrs.generate(model, [{"role": "user", "content": "Hi!"}], max_tokens=32).text)

Names are imported lazily, so `mrs --help` and `mrs list` do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Completion": "mrs.engine.generate",
    "generate": "mrs.engine.generate",
    "generate_batch": "mrs.engine.generate",
    "stream": "mrs.engine.generate",
    "MrsError": "mrs.errors",
    "Model": "mrs.model",
    "load": "mrs.model",
    "SamplingParams": "mrs.sampling",
    "embed": "mrs.embedding",
    "perplexity": "mrs.evaluate",
}

__all__ = ["Completion", "Model", "MrsError", "SamplingParams", "__version__", "embed", "generate", "generate_batch",
           "load", "perplexity", "stream"]

if TYPE_CHECKING:
    from mrs.embedding import embed
    from mrs.engine.generate import Completion, generate, generate_batch, stream
    from mrs.errors import MrsError
    from mrs.evaluate import perplexity
    from mrs.model import Model, load
    from mrs.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mrs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
