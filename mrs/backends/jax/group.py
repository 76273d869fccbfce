"""The JAX side of a process group (mrs/distributed.py): joining jax.distributed, and telling
which values live on devices (those travel between processes as references, not as values)."""

from __future__ import annotations

import logging
from typing import Any

import jax

from mrs.errors import MrsError

log = logging.getLogger(__name__)


def join(coordinator: str | None, num_processes: int | None, process_id: int | None, *, connect_seconds: int,
         heartbeat_seconds: int) -> tuple[str, int, int]:
    """Join the group's jax.distributed runtime (before anything else touches jax's devices);
    with no coordinator, jax finds the group itself (TPU slices, Slurm, Open MPI, Kubernetes).
    Returns (coordinator HOST:PORT, processes, this process's number)."""
    # CPU devices of different processes reach each other through gloo (accelerators use theirs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Every process must launch the same program under the same id. jax derives the id from
    # the executable's fingerprint, which covers the source locations in the program; the
    # leader and its followers trace each step from different call stacks (the server's
    # batcher there, mrs/mirror.py's loop here), so tracebacks stay out of locations.
    # With them in, jax 0.12's launches never met: every device waited in its first all-reduce.
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=connect_seconds, heartbeat_timeout_seconds=heartbeat_seconds)
    except ValueError as e:         # auto: no cluster in the environment
        raise MrsError(f"jax.distributed found no group to join here ({e})") from e
    from jax._src import distributed  # where the coordinator's address is kept (public API has none)

    coordinator = distributed.global_state.coordinator_address or coordinator
    log.info("process %d of %d joined %s: %d devices, %d here", jax.process_index(), jax.process_count(), coordinator,
             len(jax.devices()), len(jax.local_devices()))
    return coordinator, jax.process_count(), jax.process_index()


def share_token(token: bytes | None, timeout_seconds: int) -> bytes:
    """The leader's secret for the mirror's handshake (mrs/mirror.py), through
    jax.distributed's own key-value store: the leader passes it, the others get it."""
    from jax._src import distributed

    client = distributed.global_state.client
    if token is not None:
        client.key_value_set_bytes("mrs/mirror-token", token)
        return token
    return client.blocking_key_value_get_bytes("mrs/mirror-token", timeout_seconds * 1000)


def holds_device_values(value: Any) -> bool:
    """Whether ``value`` (any pytree) holds a jax array."""
    return any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(value))
