"""mrs: run, serve, inspect and change open LLMs from one hackable JAX/Flax codebase.

    import mrs
    model = mrs.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    print(mrs.generate(model, [{"role": "user", "content": "Hi!"}], max_tokens=32).text)
"""

from mrs.engine.generate import Completion, generate, generate_batch, stream
from mrs.errors import MrsError
from mrs.model import Model, load
from mrs.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["Completion", "Model", "MrsError", "SamplingParams", "__version__", "generate", "generate_batch",
           "load", "stream"]
