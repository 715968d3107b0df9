"""The model part of the score: GaussianZScore, the combination, population detectors and the account subject."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from risk_engine.detectors import StreamingDetector
from risk_engine.detectors.combine import CombineSpec, DetectorOutput, combine, model_score, rank_evidence
from risk_engine.detectors.estimators import GaussianZScore, RefittedLogisticRegression, RowStore
from risk_engine.detectors.population import FrozenECDF, fit_population
from risk_engine.detectors.spec import SpecError, compile_spec_features, load_models, parse_spec_file
from risk_engine.engine import load_environments
from tests.conftest import REPO, Api, make_settings, open_api, payment, run_cli, shared_data

# -- GaussianZScore -------------------------------------------------------------------------------------------


def test_gaussian_zscore_tracks_exact_means_and_variances_then_follows_drift() -> None:
    rng = random.Random(3)
    values = [rng.gauss(50, 5) for _ in range(500)]
    det = GaussianZScore(window=1000)
    for v in values:
        det.learn_one({"a": v})
    assert det.means["a"] == pytest.approx(np.mean(values), rel=1e-9)
    assert det.vars["a"] == pytest.approx(np.var(values), rel=1e-9)  # population variance, exact
    drifting = GaussianZScore(window=100)
    for v in values:
        drifting.learn_one({"a": v})
    for _ in range(2000):
        drifting.learn_one({"a": 500.0})
    assert drifting.means["a"] == pytest.approx(500.0, rel=1e-3)  # it forgets the old level


def test_gaussian_zscore_terms_sum_to_the_score_and_clip_one_wild_feature() -> None:
    det = GaussianZScore(clip=5.0)
    rng = random.Random(5)
    for _ in range(400):
        det.learn_one({"a": rng.gauss(0, 1), "b": rng.gauss(10, 2)})
    x = {"a": 1e9, "b": 12.0}
    terms = det.terms(x)
    assert sum(terms.values()) == pytest.approx(det.score_one(x))
    assert terms["a"] == pytest.approx(5.0 / 2)  # clipped at 5 sigma, shared over 2 features
    assert det.score_one({"a": 0.0, "b": 10.0}) < det.score_one({"a": 3.0, "b": 10.0})
    floored = GaussianZScore(clip=5.0, min_std=0.5)  # the score's own loop, against its terms, with a floor
    for _ in range(100):
        floored.learn_one({"a": 1.0, "b": rng.gauss(10, 2)})
    for _ in range(50):
        x = {"a": rng.gauss(1, 3), "b": rng.gauss(10, 8)}
        assert floored.score_one(x) == pytest.approx(sum(floored.terms(x).values()))


# -- the combination ----------------------------------------------------------------------------------------------

scores = st.floats(min_value=0.0, max_value=1.0)


@given(st.lists(st.tuples(st.floats(min_value=0.1, max_value=5), scores, st.booleans()), min_size=1, max_size=5))
def test_combined_points_are_bounded_and_shares_add_up(items: list[tuple[float, float, bool]]) -> None:
    outputs = [DetectorOutput(w, s, warm) for w, s, warm in items]
    spec = CombineSpec("payment", weight=60, floor=0.6)
    m, points = combine(spec, outputs)
    assert 0.0 <= m <= 1.0 + 1e-12
    assert 0.0 <= sum(points) <= 60.0 + 1e-9
    assert all(p == 0.0 for p, o in zip(points, outputs, strict=True) if o.warming_up or o.score == 0)
    if m > 0.6:
        assert sum(points) == pytest.approx(60 * min(1.0, (m - 0.6) / 0.4))


@given(scores, scores, scores)
def test_the_model_score_rises_with_each_detector(a: float, b: float, bump: float) -> None:
    base = model_score([DetectorOutput(1, a, False), DetectorOutput(1, b, False)])
    higher = model_score([DetectorOutput(1, max(a, min(1.0, a + bump)), False), DetectorOutput(1, b, False)])
    assert higher >= base - 1e-12


def test_one_sure_detector_still_counts_and_a_warming_one_counts_as_zero() -> None:
    spec = CombineSpec("payment", weight=60, floor=0.6)
    m, points = combine(spec, [DetectorOutput(1, 1.0, False), DetectorOutput(1, 0.0, False)])
    assert m == pytest.approx(math.sqrt(0.5)) and points[0] > 0 and points[1] == 0
    warming, _ = combine(spec, [DetectorOutput(1, 1.0, False), DetectorOutput(1, 0.99, True)])
    assert warming == pytest.approx(m)  # the warming detector's 0.99 is not listened to
    both, points = combine(spec, [DetectorOutput(1, 1.0, False), DetectorOutput(1, 1.0, False)])
    assert both == pytest.approx(1.0) and sum(points) == pytest.approx(60)


def test_combine_tables_are_checked(tmp_path: Path) -> None:
    good = (REPO / "models" / "payment.toml").read_text()
    assert "\nfloor = " in good and "\nanomaly_base_rate = " in good
    (tmp_path / "a.toml").write_text(good.replace("\nfloor = ", "\nflor = "))
    with pytest.raises(SpecError, match=r"unknown key 'flor'.*did you mean 'floor'"):
        load_models(tmp_path)
    (tmp_path / "a.toml").write_text(re.sub(r"\nfloor = .*", "\nfloor = 1.5", good))
    with pytest.raises(SpecError, match=r"floor in 0\.\.1"):
        load_models(tmp_path)
    for bad in ("1.5", "0", '"often"'):
        (tmp_path / "a.toml").write_text(re.sub(r"\nanomaly_base_rate = .*", f"\nanomaly_base_rate = {bad}", good))
        with pytest.raises(SpecError, match=r"anomaly_base_rate must be a share between 0 and 1"):
            load_models(tmp_path)
    (tmp_path / "a.toml").write_text(good.replace("weight = 1\n", "weight = 1\nfloor = 0.9\n", 1))
    with pytest.raises(SpecError, match=r"'floor' is set per subject now, in \[combine.payment\]"):
        parse_spec_file(tmp_path / "a.toml")


# -- the refitted logistic regression ----------------------------------------------------------------------------


def labelled_rows(n: int, seed: int = 3) -> list[tuple[dict[str, float], bool]]:
    """Two features; fraud is far out on ``a`` (either way) and a little high on ``b``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        fraud = i % 9 == 0
        a = rng.choice([-1, 1]) * rng.gauss(4, 1) if fraud else rng.gauss(0, 1)
        rows.append(({"a": a, "b": rng.gauss(1.0 if fraud else 0.0, 1)}, fraud))
    return rows


def test_the_refitted_regression_is_scikit_learns_fit_on_the_clipped_terms() -> None:
    from sklearn.linear_model import LogisticRegression

    rows = labelled_rows(300)
    model = RefittedLogisticRegression(C=0.5, clip=3.0, refit_every=1000)
    for x, y in rows:
        model.learn_one(x, y)
    assert model.predict_proba_one(rows[0][0]) == {}  # not fitted before ``refit_every`` labels
    model.refit()
    data = np.array([[x["a"], x["b"]] for x, _ in rows])
    labels = np.array([y for _, y in rows])
    z = np.clip((data - data.mean(0)) / data.std(0), -3, 3)
    terms = np.hstack([z, np.abs(z)])
    reference = LogisticRegression(C=0.5, max_iter=5000).fit((terms - terms.mean(0)) / terms.std(0), labels)
    probes = [{"a": -5.0, "b": 0.0}, {"a": 0.1, "b": 0.2}, {"a": 2.5, "b": 3.0}, {"a": 40.0, "b": -1.0}]
    for probe in probes:
        t = np.clip((np.array([probe["a"], probe["b"]]) - data.mean(0)) / data.std(0), -3, 3)
        t = (np.r_[t, np.abs(t)] - terms.mean(0)) / terms.std(0)
        expected = reference.predict_proba(t[None])[0, 1]
        assert model.predict_proba_one(probe)[True] == pytest.approx(expected, abs=1e-9)
        logit = model.intercept + sum(model.terms(probe).values())  # the explanation's terms add up
        assert logit == pytest.approx(math.log(expected / (1 - expected)), abs=1e-6)
    # far out either way is fraud: the absolute term carries what one signed weight cannot
    assert (
        model.predict_proba_one({"a": -5.0, "b": 0.0})[True] > 0.5 < model.predict_proba_one({"a": 5.0, "b": 0.0})[True]
    )
    assert model.predict_proba_one({"a": 0.0, "b": 0.0})[True] < 0.1
    # clipped: a wilder value is no surer than one at the clip
    assert model.predict_proba_one({"a": 40.0, "b": 0.0}) == model.predict_proba_one(
        {"a": 3 * data[:, 0].std() + data[:, 0].mean() + 1, "b": 0.0}
    )


def test_the_refitted_regression_refits_on_a_growing_schedule_and_keeps_bounded_rows() -> None:
    model = RefittedLogisticRegression(refit_every=10, refit_growth=0.5, max_rows=100)
    fits = []
    for x, y in labelled_rows(400):
        before = model.fitted_rows
        model.learn_one(x, y)
        if model.fitted_rows != before:
            fits.append(model.fitted_rows)
    # every 10 labels while that is more than half the rows fitted, then at half the rows; then capped at 100
    assert fits[:4] == [10, 20, 30, 45]
    assert all(later - earlier >= max(10, earlier // 2) for earlier, later in itertools.pairwise(fits) if later < 100)
    assert len(model.positives) + len(model.negatives) == 100
    assert len(model.positives) == 400 // 9 + 1  # every fraud kept (under half the rows)
    twin = RefittedLogisticRegression(refit_every=10, refit_growth=0.5, max_rows=100)
    for x, y in labelled_rows(400):
        twin.learn_one(x, y)
    assert twin.negatives.data == model.negatives.data  # the sample is seeded: a replay keeps the same rows
    kept = {round(model.negatives[i][0], 12) for i in range(len(model.negatives))}
    positions = [i for i, (x, y) in enumerate(labelled_rows(400)) if not y and round(x["a"], 12) in kept]
    assert min(positions) < 100 and max(positions) > 300  # a sample of the whole stream, not its start or end


def test_one_outcome_fits_nothing() -> None:
    model = RefittedLogisticRegression(refit_every=5)
    for x, _ in labelled_rows(50):
        model.learn_one(x, False)
    assert model.predict_proba_one({"a": 9.0, "b": 9.0}) == {} and model.fitted_rows == 0
    model.learn_one({"a": 9.0, "b": 9.0}, True)  # the first fraud: fitted at once
    assert model.fitted_rows == 51
    assert model.predict_proba_one({"a": 9.0, "b": 9.0})[True] > 3 * model.predict_proba_one({"a": 0.0, "b": 0.0})[True]


def test_fits_that_finish_out_of_order_leave_the_later_one_in_use() -> None:
    model = RefittedLogisticRegression(refit_every=50)
    rows = labelled_rows(100)
    for x, y in rows[:50]:
        model.learn_one(x, y, refit=False)
    earlier = model.pending
    for x, y in rows[50:]:
        model.learn_one(x, y, refit=False)
    later = model.pending
    assert earlier is not None and later is not None and earlier is not later
    model.install(model.compute_fit(later), later)  # the second label request's fit lands first
    in_use = model.fit
    model.install(model.compute_fit(earlier), earlier)
    assert model.fit is in_use and model.fitted_rows == 100 and model.pending is None
    inline = RefittedLogisticRegression(refit_every=50)
    for x, y in rows:
        inline.learn_one(x, y)
    assert inline.predict_proba_one(rows[0][0]) == model.predict_proba_one(rows[0][0])


def test_the_default_fraud_model_explains_a_payment_by_the_feature_made_extreme(tmp_path: Path) -> None:
    config = load_models(REPO / "models")
    (spec,) = [s for s in config.specs if s.name == "payment_fraud"]
    envs, _, _ = load_environments(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}"))
    det = StreamingDetector(spec, compile_spec_features(spec, envs["payment"]))
    assert isinstance(det._steps[1], RefittedLogisticRegression)
    rng = random.Random(8)
    for label_id in range(1, 301):
        fraud = label_id % 6 == 0
        x = {f"V{k}": rng.gauss(0, 1) for k in range(1, 29)} | {"amount": rng.gauss(4, 1)}
        if fraud:
            x["V14"] = rng.gauss(-7, 1)  # frauds sit far out on V14 only
        det.learn_label(x, fraud, label_id)
    probe = {f"V{k}": 0.0 for k in range(1, 29)} | {"amount": 4.0, "V14": -8.0}
    top = det.explain(probe)
    assert top and top[0][0] == "V14", top
    assert det.score_one(probe)[1] > 0.9 > 0.1 > det.score_one(probe | {"V14": 0.0})[1]


class WatchedLock:
    """A lock that knows whether it is held."""

    def __init__(self) -> None:
        self.held = False

    def __enter__(self) -> None:
        assert not self.held
        self.held = True

    def __exit__(self, *exc: object) -> None:
        self.held = False


def test_a_deferred_refit_is_computed_outside_the_lock_and_lands_as_an_inline_one_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_text = (REPO / "models" / "payment.toml").read_text()
    (tmp_path / "payment.toml").write_text(spec_text)
    config = load_models(tmp_path)
    (spec,) = [s for s in config.specs if s.name == "payment_fraud"]
    envs, _, _ = load_environments(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}"))
    features = compile_spec_features(spec, envs["payment"])
    deferred, inline = StreamingDetector(spec, features), StreamingDetector(spec, features)
    lock = WatchedLock()
    estimator = deferred._steps[1]
    assert isinstance(estimator, RefittedLogisticRegression)
    compute = RefittedLogisticRegression.compute_fit

    def compute_outside_the_lock(self: RefittedLogisticRegression, rows: Any) -> Any:
        assert not lock.held, "a refit must not hold up scoring"
        return compute(self, rows)

    monkeypatch.setattr(RefittedLogisticRegression, "compute_fit", compute_outside_the_lock)
    probe = {f"V{k}": 0.0 for k in range(1, 29)} | {"amount": 3.0, "V14": -6.0}
    rows = labelled_rows(120)
    for label_id, (x, fraud) in enumerate(rows, start=1):
        vector = {f"V{k}": 0.0 for k in range(1, 29)} | {"amount": 3.0, "V14": x["a"], "V4": x["b"]}
        with lock:
            deferred.learn_label(vector, fraud, label_id, defer_refit=True)
        inline.learn_label(vector, fraud, label_id)
        if label_id == 50:  # due: pending, not yet in use
            assert estimator.pending is not None and estimator.fit is None
            snapshot = pickle.dumps(deferred.state())
            deferred.complete_refit(lock)
            assert estimator.pending is None
            assert deferred.score_one(probe) == inline.score_one(probe)
    deferred.complete_refit(lock)
    assert deferred.score_one(probe) == inline.score_one(probe)
    # a snapshot taken while a fit was pending restores with it done
    restored = StreamingDetector(spec, features)
    assert restored.restore(pickle.loads(snapshot))
    assert restored._steps[1].pending is None and restored._steps[1].fitted_rows == 50


# -- population detectors ---------------------------------------------------------------------------------------

POPULATION = """
[detectors.pop]
subject = "payment"
kind = "population"
estimator = "{estimator}"
[detectors.pop.features]
amount = "amount.major"
items = "item_count"
"""


def population_spec(tmp_path: Path, estimator: str) -> Any:
    path = tmp_path / "pop.toml"
    path.write_text(POPULATION.format(estimator=estimator))
    (spec,) = parse_spec_file(path)
    return spec


@pytest.mark.parametrize("method", ["ECOD", "COPOD"])
def test_the_frozen_ecdf_ranks_new_rows_as_pyod_does(method: str) -> None:
    from pyod.models.copod import COPOD
    from pyod.models.ecod import ECOD

    rng = np.random.default_rng(11)
    train = np.column_stack([rng.lognormal(3, 1, 400), rng.normal(0, 1, 400), rng.exponential(2, 400)])
    fresh = np.column_stack([rng.lognormal(3, 1.5, 40), rng.normal(0, 2, 40), rng.exponential(3, 40)])
    model = (ECOD if method == "ECOD" else COPOD)().fit(train)
    theirs = np.array([model.decision_function(row[None, :])[0] for row in fresh])  # pyod, one row at a time
    frozen = FrozenECDF(train, method)
    ours = np.array([frozen.score(list(row)) for row in fresh])
    same = np.isclose(ours, theirs, rtol=1e-6, atol=1e-6)
    if method == "ECOD":
        assert same.all()
    else:  # pyod takes each column's skewness with the new row in; frozen, a near-symmetric column can differ
        assert (
            same.mean() > 0.8 and np.corrcoef(np.argsort(np.argsort(ours)), np.argsort(np.argsort(theirs)))[0, 1] > 0.95
        )
    assert np.allclose(frozen.score_matrix(fresh), ours)


@pytest.mark.parametrize("estimator", ["ECOD", "HBOS", "IForest"])
def test_a_fit_calibrates_against_its_population(tmp_path: Path, estimator: str) -> None:
    spec = population_spec(tmp_path, estimator)
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(100, 10, 500), rng.integers(1, 3, 500)])
    fit = fit_population(spec, X, datetime.now(UTC))
    usual = fit.calibrate(fit.raw([100.0, 1.0]))
    extreme = fit.calibrate(fit.raw([400.0, 2.0]))
    assert usual < 0.8 and extreme > 0.95
    with pytest.raises(ValueError, match="at least 10 events"):
        fit_population(spec, X[:5], datetime.now(UTC))


def test_population_detectors_take_no_scaler_and_only_pyod_estimators(tmp_path: Path) -> None:
    path = tmp_path / "pop.toml"
    path.write_text(
        POPULATION.format(estimator="ECOD").replace(
            'kind = "population"', 'kind = "population"\nscaler = "MinMaxScaler"'
        )
    )
    with pytest.raises(SpecError, match="take no scaler"):
        parse_spec_file(path)
    path.write_text(POPULATION.format(estimator="HalfSpaceTrees"))
    with pytest.raises(SpecError, match='an anomaly one \\(set kind = "anomaly"\\)'):
        parse_spec_file(path)


def accounts(n: int, start: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(start)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    return [
        {
            "account_id": f"acct_{i}",
            "occurred_at": (t0 + timedelta(minutes=i)).isoformat(),
            "role": "buyer",
            "attributes": {"sent_tnx": rng.randint(5, 50), "received_tnx": rng.randint(5, 50)},
        }
        for i in range(start, start + n)
    ]


def score_account(api: Api, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
    r = api.client.post("/v1/accounts/score", json=body, headers=api.headers())
    assert r.status_code == expect, r.text
    result: dict[str, Any] = r.json()
    return result


def test_a_fit_over_http_is_scored_with_and_picked_up_by_another_worker(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0.2)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    try:
        for body in accounts(60):
            score_account(a, body)
        unfitted = {m["name"]: m for m in score_account(b, accounts(1, start=100)[0])["models"]}
        assert unfitted["account_population"]["warming_up"]
        assert (
            a.client.post("/v1/models/account_population/fit", json={}, headers=a.headers("scorer")).status_code == 403
        )
        r = a.client.post("/v1/models/account_population/fit", json={}, headers=a.headers("analyst"))
        assert r.status_code == 200, r.text
        assert r.json()["events"] == 61 and r.json()["version"].startswith("1.")
        odd = {**accounts(1, start=200)[0], "attributes": {"sent_tnx": 90_000, "received_tnx": 0}}
        deadline = __import__("time").monotonic() + 15
        while b.engine.detector("account_population")[1].warming_up and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        seen = {m["name"]: m for m in score_account(b, odd)["models"]}
        assert not seen["account_population"]["warming_up"] and seen["account_population"]["score"] > 0.98
        listed = {m["name"]: m for m in b.client.get("/v1/models", headers=b.headers()).json()}
        assert listed["account_population"]["calibrated"] and listed["account_population"]["score_quantiles"]
        with a.engine.db.connect() as conn:
            actions = [row[0] for row in conn.exec_driver_sql("SELECT action FROM audit_log")]
        assert "model.fit" in actions
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_accounts_are_scored_labelled_and_replayed_like_payments(api: Api) -> None:
    body = accounts(1)[0]
    first = score_account(api, body)
    assert first["account_id"] == "acct_0" and first["policy_version"] == "account:v1"
    again = api.client.post("/v1/accounts/score", json=body, headers=api.headers())
    assert again.json() == first and again.headers.get("Idempotent-Replayed") == "true"
    changed = {**body, "attributes": {"sent_tnx": 1}}
    assert api.client.post("/v1/accounts/score", json=changed, headers=api.headers()).status_code == 409
    undeclared = {**accounts(1, start=5)[0], "attributes": {"nope": 1}}
    r = api.client.post("/v1/accounts/score", json=undeclared, headers=api.headers())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "attributes.nope"
    label = {"label_id": "l_acct", "subject": "account", "payment_id": "acct_0", "label": "confirmed_fraud"}
    assert api.client.post("/v1/labels", json=label, headers=api.headers()).status_code == 201
    assert api.engine.detector("account_fraud")[1].labels_seen == 1
    as_payment = {**label, "label_id": "l_acct2", "subject": "payment"}
    assert api.client.post("/v1/labels", json=as_payment, headers=api.headers()).status_code == 404
    # a payment and an account may share an id: subjects keep their own idempotency
    assert api.score(payment(payment_id="acct_0"))["payment_id"] == "acct_0"


def test_a_payment_answer_names_the_model_score_and_each_detectors_features(sqlite_api: Api) -> None:
    rng = random.Random(1)
    t0 = datetime(2026, 11, 22, 8, tzinfo=UTC)
    for i in range(400):
        attrs = {f"V{k}": rng.gauss(0, 1) for k in range(1, 29)}
        body = payment(payment_id=f"warm_{i}", occurred_at=(t0 + timedelta(seconds=10 * i)).isoformat())
        body["attributes"] = attrs
        sqlite_api.score(body)
    wild = payment(payment_id="wild", occurred_at=(t0 + timedelta(hours=2)).isoformat())
    wild["attributes"] = {**{f"V{k}": rng.gauss(0, 1) for k in range(1, 29)}, "V14": -40.0, "V17": -35.0}
    answer = sqlite_api.score(wild)
    anomaly = next(m for m in answer["models"] if m["name"] == "payment_anomaly")
    assert anomaly["score"] > 0.99 and anomaly["points"] > 0
    assert {f["feature"] for f in anomaly["top_features"][:2]} == {"V14", "V17"}
    # the fraud model is warming up (no labels): it counts as 0 with its weight, the anomaly rank as evidence
    config = load_models(REPO / "models")
    combine_spec, specs = config.combine_for("payment"), {d.name: d for d in config.specs}
    assert combine_spec.anomaly_base_rate is not None
    weights = specs["payment_anomaly"].weight, specs["payment_fraud"].weight
    evidence = rank_evidence(anomaly["score"], combine_spec.anomaly_base_rate)
    assert answer["model_score"] == pytest.approx(evidence * math.sqrt(weights[0] / sum(weights)), abs=1e-3)
    reason = next(r for r in answer["reasons"] if r["code"] == "MODEL_PAYMENT_ANOMALY")
    assert reason["score_delta"] == pytest.approx(anomaly["points"], abs=0.01) and "V14" in reason["text"]


def test_the_account_eval_shows_the_supervised_model_is_not_fooled_like_the_outlier_score(tmp_path: Path) -> None:
    path = shared_data("ethereum_accounts_dev.csv")
    result = run_cli(
        "eval", "accounts", "--data", str(path), "--label-delay", "100", "--limit", "2000", "--json", home=tmp_path
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    models = figures["models"]
    assert figures["events"] == 2000 and figures["positives"] > 300  # shuffled: both classes from the start
    assert models["account_anomaly"]["roc_auc"] < 0.6  # an outlier score points the wrong way here
    assert models["account_fraud"]["roc_auc"] > 0.85 and models["combined"]["roc_auc"] > 0.85


@given(st.lists(st.tuples(st.sampled_from(["add", "replace", "remove", "widen"]), st.integers(0, 50)), max_size=40))
def test_a_row_store_holds_what_a_list_of_rows_would(ops: list[tuple[str, int]]) -> None:
    store, rows, width = RowStore(2), list[list[float]](), 2
    for step, (op, n) in enumerate(ops):
        row = [float(step * 10 + k) for k in range(width)]
        if op == "add" or not rows:
            store.append(row)
            rows.append(row)
        elif op == "replace":
            store.replace(n % len(rows), row)
            rows[n % len(rows)] = row
        elif op == "remove":
            i = n % len(rows)
            rows[i] = rows[-1]
            rows.pop()
            store.remove(i)
        else:
            width += 1
            store = store.widened(width)
            rows = [[*r, 0.0] for r in rows]
        copy = store.copy()
        assert [store[i] for i in range(len(store))] == rows == [copy[i] for i in range(len(copy))]
        assert store.matrix().shape == (len(rows), width)
        assert pickle.loads(pickle.dumps(store)).data == store.data
