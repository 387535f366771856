"""The garbage collector's policy: what survives a full collection is frozen, and once an
hour everything is let go again so that cyclic garbage is found."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from control_plane.collector import UNFREEZE_EVERY_S, Collector


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_survivors_of_a_full_collection_are_left_out_of_the_next_ones(unfrozen: None) -> None:
    now = [0.0]
    collector = Collector(clock=lambda: now[0])
    collector.install()
    try:
        gc.collect(1)  # a young collection freezes nothing
        assert gc.get_freeze_count() == 0
        gc.collect()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        # An hour on, the next full collection walks everything again, then freezes anew.
        now[0] += UNFREEZE_EVERY_S
        gc.collect()
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert gc.get_freeze_count() > 0
    finally:
        collector.remove()
    assert gc.get_freeze_count() == 0
    assert collector.after_collection not in gc.callbacks


def test_cyclic_garbage_made_before_a_freeze_is_found_after_the_hour(unfrozen: None) -> None:
    now = [0.0]
    collector = Collector(clock=lambda: now[0])
    collector.install()
    try:

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, alive for now
        gone = weakref.ref(a)
        gc.collect()  # it survives, and is frozen
        del a, b  # garbage now
        gc.collect()
        assert gone() is not None  # frozen: full collections within the hour do not see it
        now[0] += UNFREEZE_EVERY_S
        gc.collect()  # unfreezes at its end
        gc.collect()  # walks everything
        assert gone() is None
    finally:
        collector.remove()
