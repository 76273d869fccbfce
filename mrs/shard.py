"""Tensor parallelism, backend-free: which logical axes split over the devices, and what a
model must look like for N devices to share it.

Every parameter and cache leaf names its axes logically (``mrs.archs.layers.param``,
``KVCache.AXES``): ``kv_heads``, ``heads``, ``mlp``, ``vocab``, ``inner``. ``RULES`` maps
those names onto the one mesh axis, ``model``; a backend turns the result into its own
shardings (``mrs/backends/jax/layout.py``). This is Megatron's layout: q/k/v and gate/up are
split by output columns (heads, MLP units), o_proj and down_proj by input rows, so each
attention and MLP block needs one all-reduce; the vocabulary is split on the embedding and
the output head; Mamba splits its inner channels.

Query heads must divide over the devices. Where kv heads are fewer than the devices (Gemma
3 270M has one), each is replicated: the fused q/k/v projection [K, G + 2, H, D] is
rewritten at load as [K r, G / r + 2, H, D], each new group holding G / r of the original
group's query heads and a copy of its key and value heads. Attention computes the same
numbers; the cache holds r copies of each kv head, one per device that needs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mrs.errors import InvalidParameterError

AXIS = "model"

# logical axis -> mesh axis (None: every device holds all of it)
RULES: dict[str, str | None] = {
    "kv_heads": AXIS,     # fused q/k/v [K, G + 2, H, D] and the KV cache's head axis
    "heads": AXIS,        # o_proj's input (whole heads), Phi's separate q/k/v outputs
    "mlp": AXIS,          # gate/up outputs, down_proj's input
    "vocab": AXIS,        # embeddings and the output head
    "inner": AXIS,        # Mamba's channels: in_proj, conv, x_proj's input, dt_proj, A, D, out_proj
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one model splits over ``devices``: its kv heads repeat ``kv_repeat`` times."""

    devices: int
    kv_repeat: int = 1

    def spec(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
        """The mesh axis of each dimension: the first dimension whose logical axis a rule splits
        and whose size the devices divide (one array cannot split twice over one mesh axis)."""
        out: list[str | None] = [None] * len(shape)
        if self.devices == 1:
            return tuple(out)
        for i, (name, size) in enumerate(zip(axes, shape)):
            mesh_axis = RULES.get(name)
            if mesh_axis is not None and size % self.devices == 0:
                out[i] = mesh_axis
                break
        return tuple(out)


def plan(config: Any, devices: int) -> Plan:
    """The Plan for ``config`` over ``devices``, or a clear error saying what does not divide."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise InvalidParameterError("tensor_parallel", devices, "a whole number of devices, at least 1")
    if devices == 1:
        return Plan(1)
    name = type(config).__name__
    if hasattr(config, "state_size"):                               # Mamba: inner channels
        inner = int(config.intermediate_size)
        if inner % devices:
            raise InvalidParameterError(
                "tensor_parallel", devices, f"a divisor of the model's {inner} inner channels ({name})")
        return Plan(devices)
    if hasattr(config, "num_key_value_heads"):
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        if heads % devices:
            raise InvalidParameterError(
                "tensor_parallel", devices, f"a divisor of the model's {heads} query heads ({name})")
        if kv_heads % devices == 0:
            return Plan(devices)
        if devices % kv_heads == 0:     # then each kv head's query heads split devices / kv_heads ways
            return Plan(devices, devices // kv_heads)
        raise InvalidParameterError(
            "tensor_parallel", devices,
            f"a divisor or a multiple of the model's {kv_heads} kv heads ({heads} query heads, {name})")
    raise InvalidParameterError("tensor_parallel", devices, f"1: {name} models do not run tensor parallel")


def running_config(config: Any, plan_: Plan) -> Any:
    """The config the devices run: kv heads repeated as the plan says (the checkpoint keeps its own)."""
    if plan_.kv_repeat == 1:
        return config
    return dataclasses.replace(config, num_key_value_heads=int(config.num_key_value_heads) * plan_.kv_repeat)


def is_fused_qkv(axes: tuple[str, ...]) -> bool:
    """Whether a leaf is (part of) a fused q/k/v projection, [K, G + 2, ...]."""
    return tuple(axes[:2]) == ("kv_heads", "qkv")


def checkpoint_shape(shape: tuple[int, ...], plan_: Plan) -> tuple[int, ...]:
    """The shape a fused q/k/v leaf of the running model has in the checkpoint."""
    r = plan_.kv_repeat
    kv, parts = shape[0], shape[1]
    return (kv // r, (parts - 2) * r + 2) + tuple(shape[2:])


def repeat_kv(array: np.ndarray, repeat: int) -> np.ndarray:
    """A fused q/k/v leaf [K, G + 2, ...] -> [K r, G / r + 2, ...]: new group k r + j holds query
    heads j G/r .. (j + 1) G/r of group k, then group k's key and value heads."""
    if repeat == 1:
        return array
    kv, parts = array.shape[0], array.shape[1]
    group = parts - 2
    if group % repeat:
        raise ValueError(f"{group} query heads per kv head do not split into {repeat}")
    per = group // repeat
    q = array[:, :group].reshape((kv, repeat, per) + array.shape[2:])
    kv_parts = np.broadcast_to(array[:, None, group:], (kv, repeat, 2) + array.shape[2:])
    return np.concatenate([q, kv_parts], axis=2).reshape((kv * repeat, per + 2) + array.shape[2:])
