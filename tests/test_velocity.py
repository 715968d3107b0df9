"""Velocity windows are exact: checked against brute force on random streams, late events included."""

from __future__ import annotations

import ipaddress
import math
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk_engine.dsl import AggSpec
from risk_engine.features.lists import PREFIX_LEN, ip_prefix
from risk_engine.features.velocity import SWEEP_EVERY, VelocityState

SPECS = (
    AggSpec("count", None, "card", 60.0),
    AggSpec("sum", "amount", "card", 300.0),
    AggSpec("avg", "amount", "card", 300.0),
    AggSpec("distinct", "buyer", "card", 120.0),
)

events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=1000, allow_nan=False).map(lambda t: round(t, 1)),
        st.sampled_from(["c1", "c2", "c3"]),
        st.integers(min_value=1, max_value=500),
        st.sampled_from(["b1", "b2", "b3", "b4"]),
    ),
    max_size=120,
)


def brute(
    history: list[tuple[float, int, dict[str, Any]]], spec: AggSpec, record: dict[str, Any], ts: float
) -> float | None:
    rows = [r for t, _, r in history if r["card"] == record["card"] and ts - spec.window_s < t <= ts]
    if spec.func == "count":
        return len(rows)
    if spec.func == "sum":
        return sum(r["amount"] for r in rows)
    if spec.func == "avg":
        return sum(r["amount"] for r in rows) / len(rows) if rows else None
    return len({r["buyer"] for r in rows})


@settings(max_examples=100, deadline=None)
@given(events, st.booleans())
def test_aggregates_equal_brute_force(stream: list[tuple[float, str, int, str]], in_order: bool) -> None:
    if in_order:
        stream = sorted(stream)
    state = VelocityState(SPECS)
    history: list[tuple[float, int, dict[str, Any]]] = []
    for seq, (ts, card, amount, buyer) in enumerate(stream):
        record = {"card": card, "amount": amount, "buyer": buyer}
        got = state.query(record, ts)
        for spec in SPECS:
            want = brute(history, spec, record, ts)
            assert got[spec.id] == want, (spec.id, ts, got[spec.id], want)
        state.add(record, ts)
        history.append((ts, seq, record))


@settings(max_examples=60, deadline=None)
@given(events, events, st.integers(min_value=0, max_value=3))
def test_a_state_assembled_from_kept_and_replayed_aggregates_equals_brute_force(
    before: list[tuple[float, str, int, str]], after: list[tuple[float, str, int, str]], split: int
) -> None:
    """What a publish does when the new policy names aggregates the state does not keep: the kept ones keep
    their windows, the missing ones are replayed, and the assembled state goes on exactly."""
    kept_specs, missing_specs = SPECS[:split], SPECS[split:]
    kept = VelocityState(kept_specs)
    replayed = VelocityState(missing_specs)
    history: list[tuple[float, int, dict[str, Any]]] = []
    for seq, (ts, card, amount, buyer) in enumerate(before):
        record = {"card": card, "amount": amount, "buyer": buyer}
        kept.add(record, ts)
        replayed.add(record, ts)
        history.append((ts, seq, record))
    state = VelocityState.assembled(SPECS, [kept, replayed], kept.cap)
    for spec in kept_specs:
        assert state._windows[spec.id] is kept._windows[spec.id]  # not rebuilt
    for seq, (ts, card, amount, buyer) in enumerate(after, start=len(before)):
        record = {"card": card, "amount": amount, "buyer": buyer}
        got = state.query(record, ts)
        for spec in SPECS:
            assert got[spec.id] == brute(history, spec, record, ts), (spec.id, ts)
        state.add(record, ts)
        history.append((ts, seq, record))
    assert set(state._windows) == {s.id for s in SPECS}
    if missing_specs:
        with pytest.raises(KeyError):  # an aggregate no source keeps is never silently empty
            VelocityState.assembled(SPECS, [kept], kept.cap)


float_amounts = st.one_of(
    st.integers(min_value=1, max_value=10**6).map(lambda cents: cents / 100),  # money in major units
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(min_value=0, max_value=1000, allow_nan=False), float_amounts), max_size=60),
    st.randoms(use_true_random=False),
)
def test_a_float_sum_is_exact_whatever_order_its_events_came_in(stream: list[tuple[float, float]], rng: Any) -> None:
    """The same events taken in in another order (a worker following another's, a rebuild from storage) give
    the same sum to the last bit: the correctly rounded sum of the window's values, as ``math.fsum`` gives."""
    spec = AggSpec("sum", "amount", "card", 300.0)
    shuffled = list(enumerate(stream))
    rng.shuffle(shuffled)
    states = []
    for order in (list(enumerate(stream)), shuffled):
        state = VelocityState((spec,))
        for _, (ts, amount) in order:
            state.add({"card": "c", "amount": amount}, ts)
        states.append(state)
    for at in sorted({ts for ts, _ in stream} | {1300.0}):
        want = math.fsum(a for ts, a in stream if at - 300.0 < ts <= at)
        got = [state.query({"card": "c"}, at)[spec.id] for state in states]
        assert got == [want, want], (at, got, want)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=-30, max_value=30, allow_nan=False),  # how late or early against the clock
            float_amounts,
            st.sampled_from(["b1", "b2", "b3", "b4", "b5"]),
        ),
        max_size=150,
    )
)
def test_events_a_little_out_of_order_on_one_busy_key_equal_brute_force(
    stream: list[tuple[float, float, str]],
) -> None:
    """Traffic as several workers see it: times that move forward with some events a little late, all on one
    key. Late queries answered from the running value adjusted by the entries in between (or scanned, when
    that is shorter) give exactly what a count over the window does: float sums to the last bit."""
    specs = (AggSpec("sum", "amount", "ip", 60.0), AggSpec("distinct", "buyer", "ip", 45.0))
    state = VelocityState(specs)
    seen: list[tuple[float, float, str]] = []
    for i, (jitter, amount, buyer) in enumerate(stream):
        ts = i * 2.0 + jitter
        got = state.query({"ip": "ip1"}, ts)
        window = [(a, b) for t, a, b in seen if ts - 60.0 < t <= ts]
        assert got[specs[0].id] == math.fsum(a for a, _ in window), (i, ts)
        assert got[specs[1].id] == len({b for t, _, b in seen if ts - 45.0 < t <= ts}), (i, ts)
        state.add({"ip": "ip1", "amount": amount, "buyer": buyer}, ts)
        seen.append((ts, amount, buyer))


class CountingList(list[Any]):
    """A list that counts the entries its reads return: how much of a window a query looked at."""

    read = 0

    def __getitem__(self, index: Any) -> Any:
        got = super().__getitem__(index)
        self.read += len(got) if isinstance(index, slice) else 1
        return got


@pytest.mark.parametrize("func", ["distinct", "sum"])
def test_a_query_a_little_late_on_a_busy_key_reads_a_few_entries_not_the_window(func: str) -> None:
    """A busy key (an IP behind a carrier's NAT, a large seller) holds a day of entries; with several workers
    many of its queries come a little late. Each read the whole window (tens of thousands of entries, a scan a
    payment, and the throughput fell as the day filled): it now reads the entries between the two times."""
    spec = AggSpec(func, "amount", "ip", 86_400.0)
    state = VelocityState((spec,))
    for i in range(20_000):
        state.add({"ip": "busy", "amount": i % 997}, float(i))
    state.query({"ip": "busy"}, 19_999.5)  # in order: the running value covers the window
    window = state._windows[spec.id]["busy"]
    values = CountingList(window.values)  # type: ignore[attr-defined]
    window.values = values  # type: ignore[attr-defined]
    late = state.query({"ip": "busy"}, 19_990.0)[spec.id]  # ten entries late
    expected = [i % 997 for i in range(20_000) if 19_990.0 - 86_400.0 < i <= 19_990.0]
    assert late == (len(set(expected)) if func == "distinct" else sum(expected))
    assert values.read <= 20, values.read


def test_an_event_never_counts_itself_and_retract_undoes_add() -> None:
    state = VelocityState(SPECS[:1])
    record = {"card": "c1"}
    assert state.query(record, 10.0)[SPECS[0].id] == 0
    state.add(record, 10.0)
    state.add(record, 20.0)
    assert state.query(record, 30.0)[SPECS[0].id] == 2
    state.retract(record, 20.0)
    assert state.query(record, 30.0)[SPECS[0].id] == 1


@settings(max_examples=100, deadline=None)
@given(events, st.lists(st.booleans(), min_size=120, max_size=120), st.randoms(use_true_random=False))
def test_retracting_failed_writes_leaves_the_aggregates_of_the_rest(
    stream: list[tuple[float, str, int, str]], failed: list[bool], rng: Any
) -> None:
    """Writes fail after other events were added (the writer answers later), late and same-time events
    included: taking the failed ones back out leaves exactly the aggregates of the events that were stored."""
    state = VelocityState(SPECS)
    records = [{"card": card, "amount": amount, "buyer": buyer} for _, card, amount, buyer in stream]
    for (ts, *_), record in zip(stream, records, strict=True):
        state.add(record, ts)
    undo = [i for i in range(len(stream)) if failed[i]]
    rng.shuffle(undo)
    for i in undo:
        state.retract(records[i], stream[i][0])
    kept = [(stream[i][0], i, records[i]) for i in range(len(stream)) if not failed[i]]
    latest = max((ts for ts, *_ in stream), default=0.0)
    for card in ("c1", "c2", "c3"):
        got = state.query({"card": card}, latest + 1.0)
        for spec in SPECS:
            assert got[spec.id] == brute(kept, spec, {"card": card}, latest + 1.0), (spec.id, card)


def test_a_windowed_count_holds_an_entry_in_a_few_bytes() -> None:
    """Memory grows with the traffic inside the longest window, so an entry must be small: a 90-day count
    over a busy key keeps every payment of those 90 days (a tuple per entry cost about 128 bytes)."""
    spec = AggSpec("count", None, "buyer", 90 * 86400.0)
    state = VelocityState([spec])
    record = {"buyer": "b1"}
    state.add(record, 0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 20_001):
            state.add(record, float(i))
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert state.query(record, 20_001.0)[spec.id] == 20_001
    assert per_entry < 20, per_entry


def test_memory_is_bounded_per_key_and_quiet_keys_are_swept() -> None:
    spec = AggSpec("count", None, "card", 10_000.0)
    state = VelocityState([spec], max_events_per_key=100)
    for i in range(1000):
        state.add({"card": "hot"}, float(i))
    assert state.query({"card": "hot"}, 1000.0)[spec.id] == 100  # capped: the oldest went first
    for i in range(50):
        state.add({"card": f"k{i}"}, 0.0)
    assert state.key_count() == 51
    assert state.sweep(now=999.0 + 10_000.0 + 3600.0 + 1.0) == 51
    assert state.key_count() == 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=300, allow_nan=False).map(lambda t: round(t, 0)),
            st.integers(min_value=1, max_value=9),
            st.integers(min_value=0, max_value=7).map(lambda n: n == 0),  # a write that failed: taken back out
        ),
        max_size=120,
    ),
    st.integers(min_value=1, max_value=12),
)
def test_a_key_at_its_cap_holds_exactly_its_newest_entries(stream: list[tuple[float, int, bool]], cap: int) -> None:
    """However the entries came (late ones, failed writes taken back out), a key at its cap holds its ``cap``
    newest entries, the oldest dropped first: each aggregate is the one over those entries. The dropped ones are
    deleted from the arrays a batch at a time, which must change nothing a query sees."""
    specs = (
        AggSpec("count", None, "ip", 100.0),
        AggSpec("sum", "amount", "ip", 150.0),
        AggSpec("distinct", "amount", "ip", 120.0),
    )
    state = VelocityState(specs, max_events_per_key=cap)
    held: list[tuple[float, int]] = []  # the model: sorted by time, a new entry after those of its time
    for ts, amount, failed in stream:
        record = {"ip": "busy", "amount": amount}
        got = state.query(record, ts)
        for spec in specs:
            rows = [a for t, a in held if ts - spec.window_s < t <= ts]
            want = {"count": len(rows), "sum": sum(rows), "distinct": len(set(rows))}[spec.func]
            assert got[spec.id] == want, (spec.func, ts, got[spec.id], want)
        state.add(record, ts)
        position = next((i for i, (t, _) in enumerate(held) if t > ts), len(held))
        held.insert(position, (ts, amount))
        del held[: max(0, len(held) - cap)]
        if failed:
            state.retract(record, ts)
            if (ts, amount) in held:  # already dropped, it is not there to take out
                held.remove((ts, amount))


def test_a_capped_distinct_count_forgets_the_oldest_values_first() -> None:
    spec = AggSpec("distinct", "buyer", "card", 3600.0)
    state = VelocityState([spec], max_events_per_key=3)
    for i, buyer in enumerate(["b1", "b2", "b1", "b3"]):
        state.add({"card": "c", "buyer": buyer}, float(i))
    assert state.query({"card": "c"}, 10.0)[spec.id] == 3  # b2, b1, b3 kept: the first b1 went
    state.add({"card": "c", "buyer": "b3"}, 11.0)
    assert state.query({"card": "c"}, 12.0)[spec.id] == 2  # b1, b3, b3
    assert state.query({"card": "c"}, 3610.0)[spec.id] == 1  # only the last b3 within the hour


def test_quiet_keys_are_swept_one_aggregate_at_a_time() -> None:
    specs = [AggSpec("count", None, field, 60.0) for field in ("card", "device", "ip")]
    state = VelocityState(specs)
    assert state._sweep_every == SWEEP_EVERY // 3  # each aggregate still swept every SWEEP_EVERY adds
    state._sweep_every = 10
    for i in range(5):  # quiet keys in every aggregate
        state.add({"card": f"c{i}", "device": f"d{i}", "ip": f"i{i}"}, 0.0)
    held = [len(state._windows[s.id]) for s in specs]
    later = 60.0 + 3600.0 + 1.0  # past every window and its grace period
    for _ in range(5, 10):
        state.add({"other": 1}, later)  # the 10th add: one aggregate swept
    assert [len(state._windows[s.id]) for s in specs] == [0, *held[1:]]
    for _ in range(10, 30):
        state.add({"other": 1}, later)
    assert state.key_count() == 0


# -- the /24 or /48 network rules see of an IP ----------------------------------------------------------------


def _reference_prefix(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's form of an IPv4 client: that client's network
    return str(ipaddress.ip_network(f"{address}/{PREFIX_LEN[address.version]}", strict=False))


@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.ip_addresses(v=4).map(lambda v4: f"::ffff:{v4}"),
        st.lists(st.sampled_from([0, 0, 1, 0xDB8, 0xFFFF]), min_size=8, max_size=8).map(
            lambda g: str(ipaddress.IPv6Address(int("".join(f"{x:04x}" for x in g), 16)))
        ),
    )
)
def test_the_ip_prefix_is_the_network_ipaddress_names(ip: str) -> None:
    assert ip_prefix(ip) == _reference_prefix(ip)


def test_the_ip_prefix_of_a_non_address_is_refused() -> None:
    for bad in ("10.0.0", "10.0.0.256", "fe80::1::2", "example.com"):
        with pytest.raises(ValueError):
            ip_prefix(bad)
