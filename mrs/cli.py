"""The `mrs` command line (Fire): thin commands over the library.

Every command validates its input; a user mistake prints one line to stderr and
exits non-zero, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import fire

from mrs.errors import MrsError

log = logging.getLogger("mrs")


class UsageError(MrsError):
    """A command-line argument is wrong."""


def _text(value: Any, name: str) -> str:
    # Fire turns "123" into an int and "a,b" into a tuple; a prompt is always text.
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        raise UsageError(f"{name} must be text")
    return str(value)


class CLI:
    """mrs — run, serve and inspect open LLMs (Llama, Mistral, Granite, Qwen, Phi, Mamba, BERT) on JAX.

    Global flags (any command): --home DIR (models directory, MRS_HOME), --device auto|cpu|gpu|tpu
    (MRS_DEVICE), --dtype auto|float32|bfloat16 (MRS_DTYPE), --verbose.
    """

    def __init__(self, home: str | None = None, device: str | None = None, dtype: str | None = None,
                 verbose: bool = False):
        self._flags = {"home": home, "device": device, "dtype": dtype}
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")

    def _settings(self):
        from mrs.config import Settings

        return Settings.load(**{k: v for k, v in self._flags.items() if v is not None})

    def _load(self, model: str):
        import mrs

        if not model:
            raise UsageError("--model is required (a folder path or an org/name in the models directory)")
        settings = self._settings()
        return mrs.load(_text(model, "--model"), dtype=settings.dtype, device=settings.device, home=settings.home)

    def generate(self, prompt: Any, model: str = "", max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.9, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 seed: int | None = None, system: str | None = None, stop: Any = None, raw: bool = False,
                 format: str = "text"):
        """Generate text for PROMPT and stream it to stdout.

        Args:
            prompt: the prompt text; '-' reads it from stdin.
            model: model folder path or org/name in the models directory (required).
            max_tokens: most new tokens to generate (default 256).
            temperature: sampling temperature; 0 is greedy (default 0.8).
            top_k: keep the K most likely tokens; 0 is off (default 40).
            top_p: nucleus sampling mass in (0, 1]; 1 is off (default 0.9).
            min_p: drop tokens below min_p x the top probability; 0 is off (default 0).
            repeat_penalty: penalty for recently seen tokens; 1 is off (default 1.0).
            seed: integer seed for repeatable sampling (default: random).
            system: a system message (uses the model's chat template).
            stop: a stop string; comma-separated for several.
            raw: send the prompt as-is, without the model's chat template.
            format: 'text' streams the text; 'json' prints one JSON object with text and stats.
        """
        import mrs

        text = sys.stdin.read() if prompt == "-" else _text(prompt, "PROMPT")
        if format not in ("text", "json"):
            raise UsageError(f"--format must be text or json, got {format!r}")
        loaded = self._load(model)
        has_template = loaded.tokenizer is not None and loaded.tokenizer.chat_template
        if raw or not has_template:
            if system is not None and not raw:
                raise UsageError("--system needs a model with a chat template")
            request: Any = text
        else:
            request = ([{"role": "system", "content": _text(system, "--system")}] if system is not None else []) + \
                      [{"role": "user", "content": text}]
        stops = None if stop is None else _text(stop, "--stop").split(",")
        options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repeat_penalty=repeat_penalty, seed=seed, stop=stops)
        if format == "json":
            done = mrs.generate(loaded, request, **options)
            print(json.dumps({"model": loaded.name, "text": done.text, "finish_reason": done.finish_reason,
                              "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                              "tokens_per_second": round(done.tokens_per_second, 2)}))
            return
        for piece in mrs.stream(loaded, request, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    def version(self):
        """Print the mrs version."""
        import mrs

        print(mrs.__version__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mrs` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        fire.Fire(CLI, command=argv, name="mrs")
    except MrsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
