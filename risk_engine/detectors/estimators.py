"""Estimators of our own, following river's protocol (``learn_one`` / ``score_one``).

``GaussianZScore`` is the default payment anomaly detector. On the ULB card data it ranks fraud better than
HalfSpaceTrees and, unlike it, does not depend on a random seed (first 2,500 rows of ``ulb_stream.csv``,
progressive ROC AUC: 0.966 here against 0.85-0.91 for HalfSpaceTrees over five seeds; see the README).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from river import base


class GaussianZScore(base.AnomalyDetector):
    """Mean absolute z-score of an event's features against their running means and variances.

    A diagonal Gaussian model of normal traffic: each feature's distance from its mean in standard deviations,
    clipped at ``clip`` so one wild feature cannot drown the others, averaged over the features. Means and
    variances are exact (Welford) for the first ``window`` events, then exponentially weighted with weight
    ``1/window``, so the model follows slow drift. It scores 0 until it has seen ``min_events`` events. The
    per-feature terms are the explanation: the score is their sum, so each term is exactly that feature's share.
    """

    def __init__(self, clip: float = 10.0, window: int = 20_000, min_events: int = 30) -> None:
        if clip <= 0 or window < 2 or min_events < 2:
            raise ValueError("clip must be positive, window and min_events at least 2")
        self.clip = clip
        self.window = window
        self.min_events = min_events
        self.n = 0
        self.means: dict[Hashable, float] = {}
        self.vars: dict[Hashable, float] = {}

    def learn_one(self, x: dict[Hashable, Any]) -> None:
        """Fold an event into the running means and variances."""
        self.n += 1
        alpha = 1.0 / min(self.n, self.window)
        means, vars_ = self.means, self.vars
        for name, value in x.items():
            mean = means.get(name, 0.0)
            delta = value - mean
            mean += alpha * delta
            means[name] = mean
            vars_[name] = (1.0 - alpha) * (vars_.get(name, 0.0) + alpha * delta * delta)

    def terms(self, x: dict[Hashable, Any]) -> dict[Hashable, float]:
        """Each feature's clipped absolute z-score divided by the number of features: the score's summands."""
        if not x:
            return {}
        clip, means, vars_ = self.clip, self.means, self.vars
        share = 1.0 / len(x)
        out: dict[Hashable, float] = {}
        for name, value in x.items():
            var = vars_.get(name, 0.0)
            z = abs(value - means.get(name, 0.0)) / var**0.5 if var > 0.0 else 0.0
            out[name] = (z if z < clip else clip) * share
        return out

    def score_one(self, x: dict[Hashable, Any]) -> float:
        """How unusual ``x`` is: 0 at the means, up to ``clip``; 0 for the first ``min_events`` events, whose
        variances are too rough to rank anything (and would sit in the calibration window as outliers)."""
        if self.n < self.min_events:
            return 0.0
        return sum(self.terms(x).values())
