"""Tokenizers from a HF model folder: encode/decode, chat templates rendered with
jinja2 the way transformers renders them, and a streaming detokenizer that never
emits half a UTF-8 character."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from mrs.errors import TokenizerError


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise TokenizerError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """A model folder's tokenizer.json plus what tokenizer_config.json says about it."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"model folder {folder} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            self.hf = HFTokenizer.from_file(str(path))
            # Some tokenizer.json files bake in padding/truncation (all-MiniLM pads to 128):
            # mrs pads and truncates itself.
            self.hf.no_padding()
            self.hf.no_truncation()
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot read {path}: {e}") from e
        config_path = folder / "tokenizer_config.json"
        try:
            config: dict = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_path} is not valid JSON: {e}") from e
        jinja_file = folder / "chat_template.jinja"
        if config.get("chat_template") is None and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text()
        self._setup(config)

    @classmethod
    def from_parts(cls, hf: HFTokenizer, config: dict) -> Tokenizer:
        """A tokenizer built elsewhere (a GGUF file's) with a tokenizer_config-like dict."""
        tokenizer = cls.__new__(cls)
        tokenizer.hf = hf
        tokenizer._setup(dict(config))
        return tokenizer

    def _setup(self, config: dict) -> None:
        self.config = config
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return self.hf.token_to_id(token) if token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages as transformers' ``apply_chat_template(tokenize=False)`` would."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; pass a plain prompt string instead")
        if self._compiled is None:
            try:
                self._compiled = _template_env().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"the model's chat template does not compile: {e}") from e
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the model's chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and ``tools``, for a template that takes them) -> token ids (the
        template supplies special tokens itself)."""
        extra = {"tools": tools} if tools else {}
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text increments.

    Decodes a short window of recent tokens and holds back output while it ends in
    U+FFFD (an incomplete multi-byte character) — the approach of TGI and vLLM.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a trailing incomplete character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
