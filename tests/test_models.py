"""The model part of the score: GaussianZScore, the combination, population detectors and the account subject."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from risk_engine.detectors.combine import CombineSpec, DetectorOutput, combine, model_score
from risk_engine.detectors.estimators import GaussianZScore
from risk_engine.detectors.population import FrozenECDF, fit_population
from risk_engine.detectors.spec import SpecError, load_models, parse_spec_file
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
    (tmp_path / "a.toml").write_text(good.replace("floor = 0.6", "flor = 0.6"))
    with pytest.raises(SpecError, match=r"unknown key 'flor'.*did you mean 'floor'"):
        load_models(tmp_path)
    (tmp_path / "a.toml").write_text(good.replace("floor = 0.6", "floor = 1.5"))
    with pytest.raises(SpecError, match=r"floor in 0\.\.1"):
        load_models(tmp_path)
    (tmp_path / "a.toml").write_text(good.replace("weight = 1\n", "weight = 1\nfloor = 0.9\n", 1))
    with pytest.raises(SpecError, match=r"'floor' is set per subject now, in \[combine.payment\]"):
        parse_spec_file(tmp_path / "a.toml")


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
    assert answer["model_score"] == pytest.approx(anomaly["score"] / math.sqrt(2), abs=1e-3)  # fraud model warming
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
