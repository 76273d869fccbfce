"""One model across several processes (one per host): the group, joined through jax.distributed.

JAX is multi-controller: every process must run the same jitted programs, in the same order,
on arrays that span all their devices. In ``mrs serve --coordinator HOST:PORT
--num-processes P --process-id I``, process 0 (the leader) runs the server and the
scheduler, as one process would; every call it makes on a model's runner (loads, caches,
prefill, decode, and the objects they return) is sent first to the other processes (the
followers), which make the same call on their own copy. Host values travel as they are;
device objects (caches, pending results, compiled steps) as numbered references, assigned
in the same order on every process and freed when the leader's copy goes.

With ``--coordinator auto`` (TPU slices, Slurm, Open MPI), jax.distributed finds the
coordinator, the count and this process's number itself.

The mirror itself (the leader's side and the followers' loop) is mrs/mirror.py; its channel
is a TCP connection from each follower to the leader, on the coordinator's port + 1. A
follower that stops (its connection closes) or whose call fails where the leader's succeeded
stops the group at once with a clear error, well before jax.distributed's own heartbeat (set
to ``HEARTBEAT_SECONDS``) would abort it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Any

from mrs import backends
from mrs.errors import MrsError

log = logging.getLogger(__name__)

AUTO = "auto"                   # --coordinator auto: jax.distributed finds the group itself
HEARTBEAT_SECONDS = 10          # jax.distributed declares a silent process dead after this
CONNECT_SECONDS = 120           # how long processes wait for each other at start


@dataclasses.dataclass(frozen=True)
class Group:
    """The processes that share each model: ``coordinator`` is process 0's HOST:PORT."""

    coordinator: str                # HOST:PORT, or "auto": found by jax.distributed (TPU, Slurm, Open MPI)
    num_processes: int | None
    process_id: int | None

    def __post_init__(self):
        if self.coordinator == AUTO:
            if (self.num_processes, self.process_id) != (None, None):
                raise MrsError("--coordinator auto finds --num-processes and --process-id itself: leave them out")
            return
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise MrsError(f"--coordinator must be HOST:PORT (a port below 65535), got {self.coordinator!r}")
        if not isinstance(self.num_processes, int) or self.num_processes < 2:
            raise MrsError(f"--num-processes must be at least 2, got {self.num_processes!r}")
        if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
            raise MrsError(f"--process-id must be 0 .. {self.num_processes - 1}, got {self.process_id!r}")

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    @property
    def mirror_address(self) -> tuple[str, int]:
        """Where the leader listens for its followers: the coordinator's port + 1 (- 1 at the
        top of the range, where a cluster's discovery may have put it)."""
        host, _, port = self.coordinator.rpartition(":")
        return host, int(port) + 1 if int(port) < 65535 else int(port) - 1


def group_backend() -> Any:
    """The backend whose runtime spans processes (JAX's jax.distributed; MLX has none here)."""
    backend = backends.backend("jax")
    if not hasattr(backend, "join_group"):
        raise MrsError("this backend cannot span several processes")
    return backend


def join(group: Group) -> Group:
    """Join the group's runtime (before anything else touches the backend's devices); the
    group as joined (with ``auto``: the coordinator, count and number the runtime found)."""
    auto = group.coordinator == AUTO
    found = group_backend().join_group(None if auto else group.coordinator, group.num_processes, group.process_id,
                                        connect_seconds=CONNECT_SECONDS, heartbeat_seconds=HEARTBEAT_SECONDS)
    # jax.distributed takes SIGTERM for its preemption notice and the process goes on: a
    # follower told to stop must stop (the leader's server sets its own handler when it runs).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda number, frame: stop("stopped by SIGTERM"))
    if not auto:
        return group
    coordinator, count, number = found
    if count < 2:
        raise MrsError("--coordinator auto found no other process (is this a TPU slice, a Slurm or an MPI job?)")
    return Group(coordinator, count, number)


def stop(message: str) -> None:
    """End this process now, with one clear line (a collective would otherwise wait for the gone peer)."""
    sys.stderr.write(f"mrs: {message}; stopping this process\n")
    sys.stderr.flush()
    os._exit(3)
