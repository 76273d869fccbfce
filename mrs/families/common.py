"""Pieces every family's config reader shares (no array library here)."""

from __future__ import annotations

from contextlib import contextmanager

from mrs.errors import UnsupportedModelError

# The activations a config.json may name; each backend's layers implement every one.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


def check_activation(name: str) -> str:
    """The activation a HF config names, or a clear error (at load, not at the first call)."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return name


@contextmanager
def reading_config():
    """Turn a missing key or a bad value in config.json into an UnsupportedModelError."""
    try:
        yield
    except KeyError as e:
        raise UnsupportedModelError(f"config.json lacks required key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"config.json has an invalid value: {e}") from e


def attention_heads(config: dict, explicit_head_dim: bool = True) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a config.json, refusing kv heads that do not
    divide the query heads. ``explicit_head_dim``: the family honours a ``head_dim`` key."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of "
                                    f"num_key_value_heads {kv_heads}")
    hidden = int(config["hidden_size"])
    head_dim = int((config.get("head_dim") if explicit_head_dim else None) or hidden // heads)
    return heads, kv_heads, head_dim
