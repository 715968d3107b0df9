"""What each part of the payment model score is worth on ulb_sample_dev.csv: the protocol of `risk-engine eval
payments --label-delay 500`, reproduced outside the engine with the engine's own estimators, so that one part
at a time can be switched back to what it was.

Each event is scored with what was learned before it; labels arrive 500 events late, 50 at a time; ROC AUC and
average precision are weighted by the file's ``weight`` column and pooled over the whole stream, as the eval
does. The parts:

* the anomaly side, ``GaussianZScore`` calibrated by ``RunningQuantile``, learning each row once or as the
  ``weight`` events it stands for (``sample_weight``);
* the supervised side, river's online logistic regression (the default until session 6) or
  ``RefittedLogisticRegression`` (today's), listened to after 20 labels and once it has seen both outcomes;
* the combination, the weighted quadratic mean of the calibrated scores with weights 1 and 1 (until session 6)
  or with the anomaly rank as evidence (``anomaly_base_rate`` 0.002) and weights 0.25 and 1 (today's).

Prints the table, then one JSON object on the last line.  Usage: python bench/ulb_combinations.py
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from river import linear_model, optim, preprocessing
from sklearn.metrics import average_precision_score, roc_auc_score

from risk_engine.detectors.calibration import RunningQuantile
from risk_engine.detectors.combine import rank_evidence
from risk_engine.detectors.estimators import GaussianZScore, RefittedLogisticRegression

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ulb_sample_dev.csv"
DELAY, BATCH, WARMUP_LABELS, BASE_RATE = 500, 50, 20, 0.002


def load() -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    """Features (V1..V28, log1p(Amount)), labels and weights, in file (time) order."""
    with DATA.open() as f:
        rows = list(csv.DictReader(f))
    features = [
        {**{f"V{i}": float(r[f"V{i}"]) for i in range(1, 29)}, "amount": math.log1p(float(r["Amount"]))} for r in rows
    ]
    return features, np.array([int(r["Class"]) for r in rows]), np.array([float(r["weight"]) for r in rows])


def anomaly_ranks(features: list[dict[str, float]], weights: np.ndarray, weighted: bool) -> np.ndarray:
    """The payment anomaly detector's calibrated score for each event, as ``models/payment.toml`` declares it."""
    model, ranks = GaussianZScore(clip=10.0, window=20_000), RunningQuantile(window=2000, warmup=50)
    out = np.zeros(len(features))
    for t, x in enumerate(features):
        raw = model.score_one(dict(x))
        out[t] = ranks.transform(raw)
        w = float(weights[t]) if weighted else 1.0
        model.learn_one(dict(x), w)
        ranks.update(raw, w)
    return out


def revealed(t: int) -> int:
    """How many labels (of the first events) have arrived when event ``t`` is scored."""
    return (t - DELAY) // BATCH * BATCH + BATCH if t >= DELAY else 0


def supervised(features: list[dict[str, float]], labels: np.ndarray, refitted: bool) -> tuple[np.ndarray, np.ndarray]:
    """(probability, listened to) for each event, learning each label as it arrives."""
    if refitted:
        model = RefittedLogisticRegression(C=0.1, clip=3.0)
    else:
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.01))
    out, ready, learned = np.zeros(len(labels)), np.zeros(len(labels), dtype=bool), 0
    for t, x in enumerate(features):
        for s in range(learned, revealed(t)):
            model.learn_one(dict(features[s]), bool(labels[s]))
        learned = max(learned, revealed(t))
        known = labels[:learned]
        ready[t] = learned >= WARMUP_LABELS and 0 < known.sum() < len(known)
        if ready[t]:
            out[t] = model.predict_proba_one(dict(x)).get(True, 0.0)
    return out, ready


def main() -> None:
    if not DATA.exists():
        sys.exit(f"{DATA} is missing")
    warnings.filterwarnings("ignore")
    features, labels, weights = load()

    def figures(score: np.ndarray) -> dict[str, float]:
        return {
            "roc_auc": round(float(roc_auc_score(labels, score, sample_weight=weights)), 4),
            "average_precision": round(float(average_precision_score(labels, score, sample_weight=weights)), 4),
        }

    sides = {"unweighted": anomaly_ranks(features, weights, False), "weighted": anomaly_ranks(features, weights, True)}
    learners = {"online": supervised(features, labels, False), "refitted": supervised(features, labels, True)}
    table: dict[str, dict[str, float]] = {}
    for side, rank in sides.items():
        table[f"anomaly {side}"] = figures(rank)
        evidence = np.array([rank_evidence(r, BASE_RATE) for r in rank])
        for learner, (proba, ready) in learners.items():
            s = np.where(ready, proba, 0.0)
            table[f"supervised {learner}"] = figures(s)
            table[f"{side} + {learner}, ranks 1:1"] = figures(np.sqrt((rank**2 + s**2) / 2))
            table[f"{side} + {learner}, evidence 0.25:1"] = figures(np.sqrt((0.25 * evidence**2 + s**2) / 1.25))
    print(f"{DATA.name}: {len(labels)} events, {labels.sum()} frauds, labels {DELAY} late; weighted, pooled")
    print(f"  {'':42s} ROC AUC  AP")
    for name, f in table.items():
        print(f"  {name:42s} {f['roc_auc']:.4f}   {f['average_precision']:.4f}")
    print(json.dumps({"data": DATA.name, "label_delay": DELAY, "figures": table}))


if __name__ == "__main__":
    main()
