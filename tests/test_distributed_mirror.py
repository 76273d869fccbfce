"""The leader's mirror (mrs/mirror.py) in one process: a follower thread on loopback and a
toy runner whose "device objects" are plain Python objects, so the protocol itself is tested
(numbering, frees, failures that diverge, a failure during a load) without jax."""

from __future__ import annotations

import gc
import socket
import threading
import time
import weakref

import pytest
from test_distributed import free_port_pair

from mrs import distributed, mirror

TOKEN = b"t" * 32


class Device:
    """What a runner hands back that must stay on its own process (a cache, a pending result)."""

    def __init__(self, value: int, live: weakref.WeakSet):
        self.value = value
        live.add(self)


class ToyRunner:
    def __init__(self, side: str, calls: list, live: weakref.WeakSet, slow_boom: float = 0.0):
        self.side, self.calls, self.live, self.slow_boom = side, calls, live, slow_boom
        live.add(self)                  # a runner counts as held too (a model's weights)

    def make(self, n: int) -> Device:
        self.calls.append(("make", n))
        return Device(n, self.live)

    def add(self, a: Device, b: Device) -> tuple[Device, int]:
        self.calls.append(("add", a.value, b.value))
        return Device(a.value + b.value, self.live), a.value + b.value

    def many(self, n: int) -> list[Device]:
        return [Device(i, self.live) for i in range(n)]

    def value(self, d: Device) -> int:
        self.calls.append(("value", d.value))
        return d.value

    def boom(self, where: str) -> int:
        """Fails on ``where`` ('leader', 'follower' or 'both'), after ``slow_boom`` seconds."""
        time.sleep(self.slow_boom)
        if where in (self.side, "both"):
            raise ValueError(f"boom on the {self.side}")
        return 1


class Toy:
    def __init__(self, runner: ToyRunner):
        self.runner = runner


class Group:
    """A leader and one follower thread; ``stopped`` collects what would have ended the process."""

    def __init__(self, monkeypatch, follower_boom: float = 0.0, leader_boom: float = 0.0, strangers: int = 0):
        self.stopped: list[str] = []
        monkeypatch.setattr(mirror, "stop", self.stopped.append)
        monkeypatch.setattr(mirror, "_holds_device_arrays", lambda value: isinstance(value, Device))
        self.leader_calls, self.follower_calls = [], []
        self.leader_live, self.follower_live = weakref.WeakSet(), weakref.WeakSet()
        port = free_port_pair()
        follower_group = distributed.Group(f"127.0.0.1:{port}", 2, 1)
        def follow():
            time.sleep(0.5 if strangers else 0)         # strangers knock first
            mirror.follow(follower_group, lambda ref: Toy(ToyRunner(
                "follower", self.follower_calls, self.follower_live, follower_boom)), token=TOKEN)

        self.follower = threading.Thread(target=follow, daemon=True)
        self.strangers = [threading.Thread(target=self._stranger, args=(port + 1, i), daemon=True)
                          for i in range(strangers)]
        for stranger in self.strangers:
            stranger.start()
        self.follower.start()
        self.leader = mirror.Leader(distributed.Group(f"127.0.0.1:{port}", 2, 0), token=TOKEN)
        self.model = self.leader.load(lambda ref: Toy(ToyRunner("leader", self.leader_calls, self.leader_live,
                                                                leader_boom)), "toy")

    @staticmethod
    def _stranger(port: int, kind: int) -> None:
        """Someone else on the mirror port: a wrong token, a right token with a number not in
        the group, a pickle, silence."""
        hellos = [mirror.HELLO + b"x" * 32 + b"\0\0\0\1", mirror.HELLO + TOKEN + b"\0\0\0\7",
                  b"\x80\x04K\x01."]
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with sock:
            if kind < len(hellos):
                sock.sendall(hellos[kind])
            time.sleep(1.0)

    def close(self) -> None:
        self.leader.close()
        self.follower.join(10)
        assert not self.follower.is_alive(), "the follower did not leave when the leader said goodbye"

    def wait_for(self, predicate, seconds: float = 10.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()


@pytest.fixture
def group(monkeypatch):
    made = []

    def make(**slow) -> Group:
        made.append(Group(monkeypatch, **slow))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_the_follower_makes_every_call_on_its_own_objects_and_frees_those_the_leader_drops(group):
    g = group()
    runner = g.model.runner
    a, b = runner.make(3), runner.make(4)
    total, plain = runner.add(a, b)                 # a device object and a plain value, numbered in order
    parts = runner.many(3)                          # a list of device objects: each its own handle
    assert plain == 7 and runner.value(total) == 7 and [runner.value(p) for p in parts] == [0, 1, 2]
    runner.value(a)                                 # the follower ran these calls in this order
    assert g.wait_for(lambda: len(g.follower_calls) == len(g.leader_calls))
    assert g.follower_calls == g.leader_calls
    assert len(g.follower_live) == 7           # the runner and six device objects
    del a, total, parts
    gc.collect()
    runner.value(b)                                 # frees travel with the next message
    assert g.wait_for(lambda: len(g.follower_live) == 2), len(g.follower_live)
    assert not g.stopped


def test_a_follower_failing_a_call_the_leader_made_stops_the_group_even_when_its_reply_comes_late(group):
    g = group(follower_boom=0.5)                    # the follower fails, and only after 100 more calls here
    runner = g.model.runner
    assert runner.boom("follower") == 1
    d = runner.make(1)
    for _ in range(100):
        runner.value(d)
    assert g.wait_for(lambda: g.stopped), "a late failure was dropped"
    assert "failed a call the leader made" in g.stopped[0] and "boom on the follower" in g.stopped[0]


def test_a_follower_failing_while_the_leaders_call_still_runs_stops_the_group_when_it_ends(group):
    g = group(leader_boom=0.5)
    assert g.model.runner.boom("follower") == 1
    assert g.wait_for(lambda: g.stopped) and "boom on the follower" in g.stopped[0]


def test_a_call_that_fails_on_the_leader_only_stops_the_group(group):
    g = group(follower_boom=0.3)        # the follower's call succeeds, later than the leader's fails
    with pytest.raises(ValueError, match="boom on the leader"):
        g.model.runner.boom("leader")
    assert g.stopped and "not on process 1" in g.stopped[0], g.stopped


def test_a_model_the_leader_drops_is_released_on_the_followers_while_idle(group):
    g = group()
    second = g.leader.load(lambda ref: Toy(ToyRunner("leader", [], weakref.WeakSet())), "second")
    kept = second.runner.make(9)
    assert g.wait_for(lambda: len(g.follower_live) == 3)       # two runners and one device object
    del second, kept
    gc.collect()                        # no call follows: the frees go out on their own
    assert g.wait_for(lambda: len(g.follower_live) == 1, 5), "the follower still holds the dropped model"


def test_only_a_process_of_the_group_is_let_in(group):
    g = group(strangers=4)
    runner = g.model.runner
    assert runner.value(runner.make(6)) == 6
    assert g.wait_for(lambda: g.follower_calls == g.leader_calls)
    assert not g.stopped


def test_a_call_that_fails_everywhere_is_the_callers_error_and_the_group_goes_on(group):
    g = group(follower_boom=0.3)
    runner = g.model.runner
    with pytest.raises(ValueError, match="boom on the leader"):
        runner.boom("both")
    # The follower's failure of the same call arrives while the leader loads another model and
    # waits for the follower's acknowledgement: neither may block the other.
    loaded = []
    loading = threading.Thread(target=lambda: loaded.append(g.leader.load(
        lambda ref: Toy(ToyRunner("leader", [], weakref.WeakSet())), "second")))
    loading.start()
    loading.join(20)
    assert loaded, "the load waited forever for the follower's acknowledgement"
    assert loaded[0].runner.value(loaded[0].runner.make(5)) == 5
    assert runner.value(runner.make(2)) == 2
    time.sleep(0.2)
    assert not g.stopped
