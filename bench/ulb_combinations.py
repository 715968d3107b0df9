"""What limits the model score on ulb_sample_dev.csv: the same protocol as `risk-engine eval payments
--label-delay 500`, reproduced outside the engine so that learners and combinations can be swapped quickly.

Each event is scored with what was learned before it; labels arrive 500 events late, 50 at a time; ROC AUC is
weighted by the file's ``weight`` column and pooled over the whole stream, as the eval does. The anomaly side is
the engine's default (mean absolute z-score against exact running means and variances, clipped at 10), either
raw (divided by the clip) or calibrated as the engine calibrates it (its rank among the last 2,000 scores,
silent for the first 50). The supervised side is river's online logistic regression (the engine's default,
listened to after 20 labels) or scikit-learn's refitted in batch on every revealed label every 50 labels.

Prints the table, then one JSON object on the last line.  Usage: python bench/ulb_combinations.py
"""

from __future__ import annotations

import bisect
import csv
import json
import sys
import warnings
from collections import deque
from pathlib import Path

import numpy as np
from river import linear_model, optim, preprocessing
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ulb_sample_dev.csv"
DELAY, BATCH, WARMUP_LABELS = 500, 50, 20


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (V1..V28, log1p(Amount)), labels and weights, in file (time) order."""
    with DATA.open() as f:
        rows = list(csv.DictReader(f))
    features = np.array([[float(r[f"V{i}"]) for i in range(1, 29)] + [np.log1p(float(r["Amount"]))] for r in rows])
    return features, np.array([int(r["Class"]) for r in rows]), np.array([float(r["weight"]) for r in rows])


def anomaly_scores(features: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """Mean |z| (clipped), each event against the running mean and variance of the events before it."""
    mean, m2 = np.zeros(features.shape[1]), np.zeros(features.shape[1])
    out = np.zeros(len(features))
    for t, x in enumerate(features):
        if t >= 2:
            std = np.maximum(np.sqrt(m2 / (t - 1)), 1e-6)
            out[t] = np.minimum(np.abs((x - mean) / std), clip).mean()
        delta = x - mean
        mean += delta / (t + 1)
        m2 += delta * (x - mean)
    return out


def rank_calibrated(raw: np.ndarray, window: int = 2000, warmup: int = 50) -> np.ndarray:
    """Each score's rank among the previous ``window`` scores (0 while warming up), as the engine calibrates."""
    out, recent, ordered = np.zeros(len(raw)), deque[float](), list[float]()
    for t, x in enumerate(raw):
        if t >= warmup:
            out[t] = bisect.bisect_left(ordered, x) / len(ordered)
        recent.append(x)
        bisect.insort(ordered, x)
        if len(recent) > window:
            ordered.pop(bisect.bisect_left(ordered, recent.popleft()))
    return out


def revealed(t: int) -> int:
    """How many labels (of the first events) have arrived when event ``t`` is scored."""
    return (t - DELAY) // BATCH * BATCH + BATCH if t >= DELAY else 0


def online_river(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """river's StandardScaler | LogisticRegression(SGD 0.01), learning each label as it arrives."""
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.01))
    names = [f"f{j}" for j in range(features.shape[1])]
    out, learned = np.zeros(len(labels)), 0
    for t, x in enumerate(features):
        for s in range(learned, revealed(t)):
            model.learn_one(dict(zip(names, features[s], strict=True)), bool(labels[s]))
        learned = max(learned, revealed(t))
        if learned >= WARMUP_LABELS:
            out[t] = model.predict_proba_one(dict(zip(names, x, strict=True))).get(True, 0.0)
    return out


def batch_refit(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scikit-learn's LogisticRegression on standardized features, refitted on every revealed label each time a
    batch of labels arrives (once it has seen 5 frauds)."""
    out, fitted_on, model = np.zeros(len(labels)), 0, None
    for t, x in enumerate(features):
        known = revealed(t)
        if known > fitted_on and labels[:known].sum() >= 5:
            mu, sd = features[:known].mean(0), features[:known].std(0) + 1e-9
            fit = LogisticRegression(max_iter=3000).fit((features[:known] - mu) / sd, labels[:known])
            model, fitted_on = (fit, mu, sd), known
        if model is not None:
            out[t] = model[0].predict_proba(((x - model[1]) / model[2])[None])[0, 1]
    return out


def main() -> None:
    if not DATA.exists():
        sys.exit(f"{DATA} is missing")
    warnings.filterwarnings("ignore")
    features, labels, weights = load()
    raw = anomaly_scores(features) / 10.0
    ranked = rank_calibrated(raw)
    online, batch = online_river(features, labels), batch_refit(features, labels)

    def auc(score: np.ndarray) -> float:
        return round(float(roc_auc_score(labels, score, sample_weight=weights)), 4)

    figures = {"anomaly_raw": auc(raw), "anomaly_rank_calibrated": auc(ranked)}
    figures |= {"supervised_online_river": auc(online), "supervised_batch_refit": auc(batch)}
    for side, anomaly in (("rank", ranked), ("raw", raw)):
        for learner, supervised in (("online", online), ("batch", batch)):
            figures[f"quadratic_mean_{side}_{learner}"] = auc(np.sqrt((anomaly**2 + supervised**2) / 2))
            figures[f"noisy_or_{side}_{learner}"] = auc(1 - (1 - anomaly) * (1 - supervised))
    print(f"{DATA.name}: {len(labels)} events, {labels.sum()} frauds, labels {DELAY} late; weighted ROC AUC")
    for name, value in figures.items():
        print(f"  {name:34s} {value:.4f}")
    print(json.dumps({"data": DATA.name, "label_delay": DELAY, "roc_auc": figures}))


if __name__ == "__main__":
    main()
