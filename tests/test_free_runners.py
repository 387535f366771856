"""Which free runner dispatch takes, kept in order as runners' load changes: the registry's
answer must always be the one a walk over every free runner would give."""

from __future__ import annotations

import random
from dataclasses import dataclass

from aiohttp import web

from control_plane.fleet.free_runners import FreeRunners
from control_plane.fleet.registry import AgentConnection, Registry, RunnerClass
from protocol.capacity import Capacity, GpuInfo


@dataclass
class TickingClock:
    """Each runner connects a moment after the one before: no two tie on connected_at."""

    now: float = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        self.now += 1.0
        return self.now


def connect(registry: Registry, clock: TickingClock, n: int, slots: int = 3) -> list[AgentConnection]:
    conns = []
    for i in range(n):
        conn = AgentConnection(
            runner_id=f"r{i}",
            account_id="acct",
            name=f"r{i}",
            tags=["gpu"] if i % 3 == 0 else [],
            status="active",
            ws=web.WebSocketResponse(),
            capacity=Capacity(slots=slots),
            clock=clock,
        )
        registry.add(conn)
        conn.ready(slots)
        conns.append(conn)
    return conns


def walked(registry: Registry, klass: RunnerClass, wanted: frozenset[str]) -> AgentConnection | None:
    """The pick by walking every connected runner of the class with a free slot."""
    members = [c for c in registry.all() if c.free_slots > 0 and c.runner_class == klass]
    return min(
        members,
        key=lambda c: (bool(wanted) and not wanted <= c.warm_models, *c.load()),
        default=None,
    )


def busy(pct: float) -> Capacity:
    return Capacity(slots=3, gpus=[GpuInfo(index=0, utilization_pct=pct)])


def test_the_pick_is_the_walks_pick_through_every_change_of_load() -> None:
    registry, rng = Registry(), random.Random(7)
    conns = connect(registry, TickingClock(), 40)
    models = [frozenset(), frozenset({"sdxl"}), frozenset({"flux"}), frozenset({"sdxl", "vae"})]
    held: dict[str, AgentConnection] = {}
    for step in range(3_000):
        conn = rng.choice(conns)
        action = rng.randrange(5)
        if action == 0 and conn.free_slots > 0:
            held[f"wf{step}"] = conn
            conn.took(f"wf{step}", rng.choice(models))
        elif action == 1 and held:
            wf_id = rng.choice(sorted(held))
            owner = held.pop(wf_id)
            owner.let_go(wf_id)
            owner.ready(3 - len(owner.jobs))
        elif action == 2:
            conn.report_capacity(busy(rng.choice([0.0, 25.0, 50.0, 99.0])), True, None)
        elif action == 3:
            conn.rename(conn.name, rng.choice([["gpu"], []]), rng.choice(["active", "active", "disabled"]))
        else:
            conn.ready(rng.randrange(4))
        for klass, members in registry.free_by_class().items():
            for wanted in models:
                assert members.best(wanted) is walked(registry, klass, wanted), (step, klass, wanted)
        # Every class with a free runner is listed, and no class without one.
        free_classes = {c.runner_class for c in registry.all() if c.free_slots > 0}
        assert set(registry.free_by_class()) == free_classes
        assert set(registry.connected_classes()) == {c.runner_class for c in registry.all()}


def test_warm_models_win_then_the_least_loaded_then_the_longest_connected() -> None:
    registry = Registry()
    a, b, c = connect(registry, TickingClock(), 3)
    for conn in (a, b, c):
        conn.rename(conn.name, [], "active")  # one class
    klass = a.runner_class
    members = registry.free_by_class()[klass]
    sdxl = frozenset({"sdxl"})
    assert members.best(sdxl) is a  # all idle and cold: the longest connected
    c.took("w1", sdxl)  # C has sdxl warm, and one job
    assert members.best(sdxl) is c
    assert members.best(frozenset()) is a
    a.report_capacity(busy(90.0), True, None)
    assert members.best(frozenset()) is b  # A's GPU is busy, B's idle
    c.let_go("w1")
    assert members.best(sdxl) is c  # idle again and warm
    assert members.best(frozenset()) is b  # as idle as C, and connected before it


def test_a_runner_that_leaves_is_no_longer_picked() -> None:
    registry = Registry()
    conns = connect(registry, TickingClock(), 4)
    for conn in conns:
        conn.rename(conn.name, [], "active")
    klass = conns[0].runner_class
    assert registry.remove(conns[0])
    assert registry.free_by_class()[klass].best(frozenset()) is conns[1]
    for conn in conns[1:]:
        registry.remove(conn)
    assert registry.free_by_class() == {}
    assert list(registry.connected_classes()) == []


def test_stale_entries_do_not_pile_up() -> None:
    free: FreeRunners[str] = FreeRunners()
    for seq in range(10_000):
        free.add(f"r{seq % 5}", frozenset(), (0, float(seq % 97), 0.0), seq)
    assert len(free) == 5
    assert max(len(group.heap) for group in free._by_warm.values()) <= 2 * 5 + 33
