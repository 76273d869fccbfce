"""The leader's mirror (mrs/distributed.py has the group): every call process 0 makes on a
model's runner is sent first to the other processes, which make the same call on their own
copy, so all of them launch the same programs in the same order.

Host values travel as they are; device objects (caches, pending results, compiled steps) as
numbered references, assigned in the same order on every process and freed when the
leader's handle goes. A follower joins with a token shared through the backend's runtime and
nothing is unpickled before it. A call that fails on some processes and not on others, or a
follower that goes away, stops the group with a clear error (``stop``).
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import logging
import pickle
import queue
import secrets
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from mrs.distributed import CONNECT_SECONDS, Group, group_backend, stop
from mrs.errors import MrsError

log = logging.getLogger(__name__)

ANSWER_SECONDS = 600            # how long a follower may take to finish a call the leader failed
HELLO = b"MRS1"                 # a follower's first bytes: this, the group's token, its number
# Runner queries that read host values only: the leader answers them itself, so a scrape of
# /metrics or /api/ps never waits behind a load or a compile (which hold the call lock).
HOST_ONLY = frozenset({"cache_max_len", "cache_lengths", "rewindable", "compiled_count"})
PLAIN = (type(None), bool, int, float, complex, str, bytes, np.ndarray, np.generic)


# --- the channel --------------------------------------------------------------------------

class Channel:
    """Length-prefixed pickles over one socket (between processes of one trusted group)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(struct.pack("!Q", len(data)) + data)

    def recv(self) -> Any:
        head = self._exactly(8)
        return pickle.loads(self._exactly(struct.unpack("!Q", head)[0]))

    def _exactly(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other process closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A device object on the wire: the number every process knows it by."""

    id: int


def number_results(value: Any, next_id: Callable[[], int], keep: Callable[[int, Any], Any]) -> Any:
    """Walk a call's result in a fixed order (``_each_leaf``'s): plain values stay; each device
    object gets the next number and becomes ``keep(number, object)``."""
    return _each_leaf(value, lambda v: v if isinstance(v, PLAIN) else keep(next_id(), v))


# --- the leader ---------------------------------------------------------------------------

class Leader:
    """Process 0's side: accepts the followers, sends each runner call before making it."""

    def __init__(self, group: Group, token: bytes | None = None):
        """Waits for every follower to connect; ``token`` is the handshake's secret (by default a
        new one, shared through the backend's runtime)."""
        self.group = group
        self._lock = threading.RLock()      # one call at a time: followers see the leader's order
        self._next = 0
        self._freed: collections.deque[int] = collections.deque()   # finalizers append from any thread
        self._acks: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        # What the followers' failures are checked against, under a lock of its own (never held
        # while waiting: the watchers take it, and a load waits on them with _lock held).
        self._outcome_lock = threading.Lock()
        self._finished = 0                            # calls up to this number have finished here
        self._failed_here: set[int] = set()           # ... and of those, these failed here too
        self._failures: dict[int, str] = {}           # a follower's error for a call still running here
        self._seq = 0
        self._closing = False
        self._followers: list[Channel] = []
        token = group_backend().share_token(secrets.token_bytes(32), CONNECT_SECONDS) if token is None else token
        server = socket.create_server(("", group.mirror_address[1]), reuse_port=False)
        deadline = time.monotonic() + CONNECT_SECONDS
        joined: set[int] = set()
        try:
            while len(joined) < group.num_processes - 1:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock, peer = server.accept()
                except TimeoutError:
                    raise MrsError(f"only {len(joined) + 1} of {group.num_processes} processes joined "
                                   f"within {CONNECT_SECONDS} s") from None
                process = self._greet(sock, token, joined)
                if process is None:
                    log.warning("the mirror port refused a connection from %s (not a process of this group)", peer)
                    sock.close()
                    continue
                joined.add(process)
                channel = Channel(sock)
                self._followers.append(channel)
                threading.Thread(target=self._watch, args=(channel, process), name=f"mrs-follower-{process}",
                                 daemon=True).start()
        finally:
            server.close()
        threading.Thread(target=self._flush_frees, name="mrs-mirror-frees", daemon=True).start()

    def _greet(self, sock: socket.socket, token: bytes, joined: set[int]) -> int | None:
        """A follower's number, from a hello that carries the group's token; None for anything
        else (nothing is unpickled from a peer before this)."""
        size = len(HELLO) + len(token) + 4
        sock.settimeout(10)
        try:
            hello = b""
            while len(hello) < size:
                chunk = sock.recv(size - len(hello))
                if not chunk:
                    return None
                hello += chunk
        except OSError:
            return None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        process = struct.unpack("!I", hello[-4:])[0]
        if not (hello.startswith(HELLO) and hmac.compare_digest(hello[len(HELLO):-4], token)):
            return None
        if not 0 < process < self.group.num_processes or process in joined:
            return None
        return process

    def _flush_frees(self) -> None:
        """Frees go out with the next message; an idle leader sends them within a second, so a
        model unloaded here is released on the followers too."""
        while not self._closing:
            time.sleep(1.0)
            if self._freed and self._lock.acquire(blocking=False):
                try:
                    if not self._closing:
                        self._broadcast(None)
                finally:
                    self._lock.release()

    def _watch(self, channel: Channel, process: int) -> None:
        """Each follower's replies: load acknowledgements, failed calls; its end stops the group."""
        while True:
            try:
                kind, *rest = channel.recv()
            except (EOFError, OSError) as e:
                if not self._closing:           # after goodbye, a follower's leaving is expected
                    stop(f"process {process} of the group stopped ({e})")
                return
            if kind == "loaded":
                self._acks.put((process, *rest))
            elif kind == "answer":
                self._answers.put((process, *rest))
            elif kind == "failed":
                seq, error = rest
                with self._outcome_lock:
                    if seq > self._finished:             # decided when the leader's call ends
                        self._failures[seq] = f"process {process}: {error}"
                        continue
                    diverged = seq not in self._failed_here
                if diverged:        # it failed there, not here: the processes no longer hold the same state
                    stop(f"process {process} failed a call the leader made ({error})")

    def close(self) -> None:
        """The leader is done: followers exit too (their jax.distributed shutdown is skipped, as is
        the leader's: its barrier would wait for processes that have left)."""
        self._closing = True        # not under the call lock: a stuck call must not keep the group up
        for channel in self._followers:
            try:
                channel.send(("bye",))
            except OSError:
                pass

    def _broadcast(self, message: tuple | None) -> None:
        """``message`` (None: only the frees) to every follower, after the frees gathered so far."""
        if self._closing:
            raise MrsError("the process group is shutting down")
        freed = []
        while self._freed:                  # popleft and append are each atomic
            freed.append(self._freed.popleft())
        for channel in self._followers:
            try:
                if freed:
                    channel.send(("free", freed))
                if message is not None:
                    channel.send(message)
            except OSError as e:
                if self._closing:
                    raise MrsError("the process group is shutting down") from None
                stop(f"cannot reach a process of the group ({e})")

    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _wrap(self, value: Any) -> Any:
        return number_results(value, self._new_id, lambda n, obj: Mirrored(self, n, obj))

    def _forget(self, number: int) -> None:
        self._freed.append(number)      # sent with the next message

    def call(self, target: int | None, name: str, args: tuple, kwargs: dict, real: Callable[..., Any]) -> Any:
        """Send ``target.name(*args, **kwargs)`` to the followers, then make the call here."""
        with self._lock:
            self._seq += 1
            seq, base = self._seq, self._next
            self._broadcast(("call", seq, target, name, _to_wire(args), _to_wire(kwargs), base))
            try:
                result = real(*_unwrap(args), **_unwrap(kwargs))
            except BaseException as e:
                self._done(seq, ok=False)
                self._agree_failed(seq, e)
                raise
            wrapped = self._wrap(result)
            self._done(seq, ok=True)
            return wrapped

    def _done(self, seq: int, ok: bool) -> None:
        with self._outcome_lock:
            self._finished = seq
            if not ok:
                self._failed_here.add(seq)      # rare (a bad request's error): kept for late replies
            failure = self._failures.pop(seq, None)
        if ok and failure is not None:
            stop(f"a process failed a call the leader made ({failure})")

    def _agree_failed(self, seq: int, error: BaseException) -> None:
        """A call failed here: it must have failed everywhere. Where a follower's succeeded, it
        has launched programs this process has not, and the group cannot go on."""
        self._broadcast(("ask", seq))
        for _ in self._followers:
            try:
                process, answered, ok = self._answers.get(timeout=ANSWER_SECONDS)
            except queue.Empty:
                stop(f"a process of the group did not finish a call that failed here ({error!r})")
                return
            if answered != seq:
                stop(f"process {process} answered for call {answered}, expected {seq}")
            elif ok:
                stop(f"a call failed here ({type(error).__name__}: {error}) but not on process {process}")

    def load(self, loader: Callable[..., Any], ref: Any, **options: Any) -> Any:
        """``loader(ref, **options)`` here and on every follower; the model's runner is mirrored."""
        with self._lock:
            number = self._new_id()
            self._broadcast(("load", number, ref, options))
            error = None
            try:
                model = loader(ref, **options)
            except Exception as e:
                error = e
            failed = []
            deadline = time.monotonic() + 3600      # a follower reads the same weights: as long as a load takes
            for _ in self._followers:
                try:
                    process, acked, problem = self._acks.get(timeout=max(1.0, deadline - time.monotonic()))
                except queue.Empty:
                    stop("a process of the group did not finish loading a model")
                if acked != number:
                    stop(f"process {process} acknowledged load {acked}, expected {number}")
                if problem is not None:
                    failed.append(f"process {process}: {problem}")
            if error is not None:
                self._forget(number)
                raise error
            if failed:
                self._forget(number)
                raise MrsError(f"the model loaded here but not everywhere ({'; '.join(failed)})")
            model.runner = Mirrored(self, number, model.runner)
            return model


class Mirrored:
    """The leader's handle on a device object (a runner, steps, a cache, a pending result):
    method calls and device-valued attributes go to the followers first."""

    __slots__ = ("_leader", "_id", "_real", "__weakref__")

    def __init__(self, leader: Leader, number: int, real: Any):
        object.__setattr__(self, "_leader", leader)
        object.__setattr__(self, "_id", number)
        object.__setattr__(self, "_real", real)
        weakref.finalize(self, leader._forget, number)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        if name in HOST_ONLY and callable(value):
            return lambda *args, **kwargs: value(*_unwrap(args), **_unwrap(kwargs))
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: self._leader.call(self._id, name, args, kwargs, value)
        if not _holds_device_arrays(value):      # a config, a name, a count: the same everywhere
            return value
        return self._leader.call(self._id, "__getattribute__", (name,), {}, lambda n: getattr(self._real, n))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._leader.call(self._id, "__call__", args, kwargs, self._real)

    def __repr__(self) -> str:
        return f"Mirrored({self._real!r})"


def _holds_device_arrays(value: Any) -> bool:
    return group_backend().holds_device_values(value)


def _each_leaf(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied inside its tuples (NamedTuples too), lists and dicts."""
    if isinstance(value, tuple):
        items = [_each_leaf(v, leaf) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_each_leaf(v, leaf) for v in value]
    if isinstance(value, dict):
        return {k: _each_leaf(v, leaf) for k, v in value.items()}
    return leaf(value)


def _to_wire(value: Any) -> Any:
    """Call arguments as sent: each handle as the number the followers know its object by."""
    return _each_leaf(value, lambda v: Ref(v._id) if isinstance(v, Mirrored) else v)


def _unwrap(value: Any) -> Any:
    """Call arguments as the leader's own objects take them."""
    return _each_leaf(value, lambda v: v._real if isinstance(v, Mirrored) else v)


# --- a follower ---------------------------------------------------------------------------

def follow(group: Group, loader: Callable[..., Any], token: bytes | None = None) -> None:
    """A follower's whole life: connect to the leader, then make every call it sends, until it
    says goodbye (then leave with ``os._exit``: jax's shutdown barrier would wait for it)."""
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            sock = socket.create_connection(group.mirror_address, timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise MrsError(f"cannot reach the leader at {group.mirror_address} ({e})") from None
            time.sleep(0.2)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    token = group_backend().share_token(None, CONNECT_SECONDS) if token is None else token
    sock.sendall(HELLO + token + struct.pack("!I", group.process_id))
    channel = Channel(sock)
    objects: dict[int, Any] = {}
    last = (0, True)            # the last call's number and whether it succeeded here
    while True:
        try:
            kind, *rest = channel.recv()
        except (EOFError, OSError) as e:
            stop(f"the leader (process 0) stopped ({e})")
            return
        if kind == "bye":
            sock.close()
            return
        if kind == "free":
            for number in rest[0]:
                objects.pop(number, None)
        elif kind == "load":
            number, ref, options = rest
            try:
                objects[number] = loader(ref, **options).runner     # nothing else keeps the model
                channel.send(("loaded", number, None))
            except Exception as e:
                channel.send(("loaded", number, f"{type(e).__name__}: {e}"))
        elif kind == "call":
            seq, *call = rest
            try:
                _run(call, objects)
                last = (seq, True)
            except Exception as e:
                last = (seq, False)
                channel.send(("failed", seq, f"{type(e).__name__}: {e}"))
        elif kind == "ask":         # the leader's call failed: did this one?
            channel.send(("answer", rest[0], last[1] if last[0] == rest[0] else True))


def _run(call: list, objects: dict[int, Any]) -> None:
    """One call the leader made, made here on this process's objects; its device-valued results
    are kept under the numbers the leader gave its own."""
    target, name, args, kwargs, base = call
    obj = objects[target]
    if name == "__call__":
        fn = obj
    elif name == "__getattribute__":
        fn = lambda attribute: getattr(obj, attribute)  # noqa: E731
    else:
        fn = getattr(obj, name)
    result = fn(*_resolve(args, objects), **_resolve(kwargs, objects))
    numbers = iter(range(base + 1, 1 << 62))
    number_results(result, lambda: next(numbers), objects.__setitem__)


def _resolve(value: Any, objects: dict[int, Any]) -> Any:
    """Call arguments as received, each number replaced by this process's object."""
    return _each_leaf(value, lambda v: objects[v.id] if isinstance(v, Ref) else v)
