"""The garbage collector's tuning: long-lived state frozen out of every walk, pauses measured, cycles among
frozen objects freed by the periodic full collection."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from risk_engine.collector import MIDDLE_EVERY, TUNING, YOUNG_OBJECTS, PauseHistogram
from risk_engine.dsl import compile_policy
from risk_engine.engine import RiskEngine, load_environments
from tests.conftest import REPO, make_settings


class Node:
    """A container the collector tracks, able to sit in a cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def tuned() -> Iterator[None]:
    was_installed = TUNING.installed
    TUNING.install()
    try:
        yield
    finally:
        if not was_installed:
            TUNING.uninstall()


def _tracked_ids() -> set[int]:
    """Ids of the objects the collector walks (frozen ones are left out)."""
    return {id(o) for o in gc.get_objects()}


def test_what_survives_a_middle_collection_is_frozen_and_walked_no_more(tuned: None) -> None:
    assert gc.get_threshold()[:2] == (YOUNG_OBJECTS, MIDDLE_EVERY)
    state = [[i] for i in range(20_000)]  # long-lived state: velocity windows, say
    frozen_before = gc.get_freeze_count()
    middle_pauses = TUNING.pauses["1"].count if "1" in TUNING.pauses else 0
    gc.collect(1)
    assert gc.get_freeze_count() >= frozen_before + len(state)
    walked = _tracked_ids()
    assert not any(id(item) in walked for item in state)
    assert id(state) not in walked
    assert TUNING.pauses["1"].count == middle_pauses + 1  # the pause was measured
    # a young collection leaves survivors where they are: only a middle one freezes
    young = [[i] for i in range(100)]
    gc.collect(0)
    walked = _tracked_ids()
    assert all(id(item) in walked for item in young)


def test_a_cycle_dropped_after_it_was_frozen_is_freed_by_the_full_collection(tuned: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    gc.collect(1)  # survived a middle collection: frozen
    del a, b
    gc.collect()  # the scheduled collections never walk frozen objects
    assert alive() is not None
    full = TUNING.collect_fully()
    assert alive() is None
    assert full.freed >= 2
    assert TUNING.pauses["full"].count >= 1
    # what is left is frozen again: the next collections walk none of it
    assert len(gc.get_objects(generation=2)) < 1_000 < full.frozen_after


def test_pause_histogram_counts_each_pause_under_its_bucket() -> None:
    histogram = PauseHistogram(buckets=(0.001, 0.01))
    histogram.counts = [0, 0, 0]
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert histogram.count == 4
    assert histogram.longest_s == 0.5
    assert histogram.total_s == pytest.approx(0.5035)


def test_a_compiled_policy_is_freed_by_reference_counting_alone() -> None:
    """Replaced policies must not wait for a full collection: a generated function kept in the namespace it
    closes over forms a cycle, which the frozen old generation would keep until the day's full collection."""
    environments, _, _ = load_environments(make_settings(Path("/nonexistent"), "sqlite://"))
    compiled = compile_policy((REPO / "rules" / "payment.rules").read_text(), environments, "payment:test")
    alive = weakref.ref(compiled.evaluate)
    gc.disable()
    try:
        del compiled
        assert alive() is None
    finally:
        gc.enable()


def test_the_poller_runs_the_full_collection_at_its_interval(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'risk.db'}", policy_poll_s=0.02, gc_full_every_hours=0.1 / 3600
    )
    engine = RiskEngine.open(settings)
    try:
        assert TUNING.installed
        before = TUNING.pauses["full"].count if "full" in TUNING.pauses else 0
        deadline = time.monotonic() + 20
        while (TUNING.pauses["full"].count if "full" in TUNING.pauses else 0) < before + 2:
            assert time.monotonic() < deadline, "the poller ran no full collection"
            time.sleep(0.05)
    finally:
        engine.close()


def test_no_full_collection_when_its_interval_is_zero(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'risk.db'}", policy_poll_s=0.01, gc_full_every_hours=0)
    engine = RiskEngine.open(settings)
    try:
        before = TUNING.pauses["full"].count if "full" in TUNING.pauses else 0
        time.sleep(0.5)  # some fifty polls
        assert (TUNING.pauses["full"].count if "full" in TUNING.pauses else 0) == before
    finally:
        engine.close()
