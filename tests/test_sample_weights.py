"""Sample weights: a payment that stands for many (a sampled stream) teaches the detectors what they would have
learned from the whole stream, through the API, and the same again after a restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from risk_engine.detectors.calibration import RunningQuantile
from risk_engine.detectors.estimators import GaussianZScore
from risk_engine.payments import PaymentIn
from tests.conftest import make_settings, open_api, payment

weighted_values = st.lists(
    st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 7.0]), st.integers(min_value=1, max_value=4)),
    min_size=1,
    max_size=60,
)


@given(weighted_values)
def test_a_weighted_event_moves_the_zscore_as_that_many_copies_would(events: list[tuple[float, int]]) -> None:
    weighted, copies = GaussianZScore(min_events=2), GaussianZScore(min_events=2)
    for value, weight in events:
        x = {"a": value, "b": 10.0 - value}
        weighted.learn_one(dict(x), float(weight))
        for _ in range(weight):
            copies.learn_one(dict(x))
    assert weighted.n == copies.n
    for name in ("a", "b"):
        assert weighted.means[name] == pytest.approx(copies.means[name], abs=1e-9)
        assert weighted.vars[name] == pytest.approx(copies.vars[name], abs=1e-9)
    probe = {"a": 4.0, "b": 1.0}
    assert weighted.score_one(probe) == pytest.approx(copies.score_one(probe), abs=1e-9)


@settings(max_examples=60)
@given(weighted_values, st.integers(min_value=1, max_value=20))
def test_a_weighted_rank_is_the_share_of_weight_below_in_the_window(
    events: list[tuple[float, int]], window: int
) -> None:
    ranks = RunningQuantile(window=window, warmup=3)
    held: list[tuple[float, float]] = []
    for value, weight in events:
        w = float(weight)  # weights of 1 come first too: the switch to weights happens mid-stream
        for probe in (0.0, 1.0, 3.5, 8.0):
            mass = sum(h for _, h in held)
            below = sum(h for v, h in held if v < probe) + 0.5 * sum(h for v, h in held if v == probe)
            expected = below / mass if held and mass >= 3 else 0.0
            assert ranks.transform(probe) == pytest.approx(expected, abs=1e-9)
        ranks.update(value, w)
        held = ([*held, (value, w)])[-window:]  # the window holds events, whatever they weigh
        assert ranks.seen == len(held)


def test_unweighted_ranks_keep_no_weights() -> None:
    ranks = RunningQuantile(window=100, warmup=5)
    values = [float(i * 7 % 17) for i in range(300)]
    for v in values:
        ranks.update(v)
    assert "_sorted_weights" not in vars(ranks)  # the request path pays nothing for weights it never sees
    held = values[-100:]
    assert ranks.transform(8.0) == (sum(v < 8.0 for v in held) + 0.5 * held.count(8.0)) / 100


def test_sample_weights_reach_the_detectors_through_the_api_and_survive_a_rebuild(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", snapshot_every=10_000)
    client, api = open_api(settings)
    rng = random.Random(4)
    bodies = []
    for i in range(120):
        body = payment(payment_id=f"w{i}", occurred_at=f"2026-11-22T10:{i // 60:02d}:{i % 60:02d}Z")
        body["attributes"] = {f"V{k}": rng.gauss(0, 1) for k in range(1, 29)}
        if i % 3 == 0:
            body["sample_weight"] = 25.0
        bodies.append(body)
    try:
        for body in bodies:
            api.score(body)
        assert api.score(bodies[0])["payment_id"] == "w0"  # idempotent: counted once
        bad = payment(payment_id="bad")
        bad["sample_weight"] = 0
        problem = api.client.post("/v1/payments/score", json=bad, headers=api.headers())
        assert problem.status_code == 422 and "sample_weight" in problem.text
        with pytest.raises(ValidationError, match="finite number"):
            PaymentIn.model_validate({**bad, "sample_weight": float("nan")})
        anomaly = api.engine.subjects["payment"].detectors[0]
        assert anomaly.name == "payment_anomaly" and anomaly.events_seen == 120
        model = anomaly._steps[1]
        assert isinstance(model, GaussianZScore)
        assert model.n == pytest.approx(80 + 40 * 25)  # the events the sample stands for
        assert anomaly.calibrator._mass == pytest.approx(80 + 40 * 25)
        stored = api.engine.get_payment("w3")
        assert stored["payment_id"] == "w3"
        live = (dict(model.means), dict(model.vars), anomaly.calibrator.transform(0.5))
    finally:
        client.__exit__(None, None, None)
    for snapshot in settings.snapshot_dir.glob("*.snapshot"):
        snapshot.unlink()  # a full rebuild from stored events
    client, api = open_api(settings)
    try:
        rebuilt = api.engine.subjects["payment"].detectors[0]
        model = rebuilt._steps[1]
        assert model.n == pytest.approx(80 + 40 * 25)
        assert model.means == pytest.approx(live[0]) and model.vars == pytest.approx(live[1])
        assert rebuilt.calibrator.transform(0.5) == pytest.approx(live[2])
    finally:
        client.__exit__(None, None, None)
