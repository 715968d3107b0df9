"""Calibration: a raw detector output becomes its rank among recent outputs, a 0-1 score with one meaning.

``0.99`` means "more unusual than 99% of the last ``window`` events", whatever the estimator or its scale,
so a rule's threshold keeps its alert rate when a detector's raw scores drift or the estimator changes.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque


class RunningQuantile:
    """Empirical CDF over a sliding window of raw scores.

    Events may carry sample weights (how many events of a sampled stream each stands for): ranks are then
    shares of the weight below, and the warm-up counts weight, so a sample ranks as its whole stream would.
    Unweighted, no weights are kept at all (the request path pays nothing for them).
    """

    _weighted = False  # class defaults: snapshots from before weights restore as unweighted
    _mass = 0.0
    _sorted_weights: list[float]  # with _sorted, once weighted
    _recent_weights: deque[float]  # with _recent, once weighted

    def __init__(self, window: int = 2000, warmup: int = 50) -> None:
        self.window = window
        self.warmup = warmup
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    @property
    def seen(self) -> int:
        """How many raw scores are in the window."""
        return len(self._sorted)

    @property
    def warm(self) -> bool:
        """True once enough scores (or weight) are held for ranks to mean something."""
        if self._weighted:
            return self._mass >= self.warmup
        return len(self._sorted) >= self.warmup

    def transform(self, raw: float) -> float:
        """Share of recent raw scores strictly below ``raw`` (ties count half); 0 while warming up."""
        if not self.warm:
            return 0.0
        below = bisect_left(self._sorted, raw)
        upto = bisect_right(self._sorted, raw)
        if self._weighted:
            weights = self._sorted_weights
            return (math.fsum(weights[:below]) + 0.5 * math.fsum(weights[below:upto])) / self._mass
        return (below + 0.5 * (upto - below)) / len(self._sorted)

    def update(self, raw: float, weight: float = 1.0) -> None:
        """Add a raw score to the window, standing for ``weight`` events."""
        if weight != 1.0 and not self._weighted:
            self._weighted = True
            self._sorted_weights = [1.0] * len(self._sorted)
            self._recent_weights = deque([1.0] * len(self._recent))
            self._mass = float(len(self._sorted))
        if not self._weighted:
            insort(self._sorted, raw)
            self._recent.append(raw)
            if len(self._recent) > self.window:
                del self._sorted[bisect_left(self._sorted, self._recent.popleft())]
            return
        at = bisect_right(self._sorted, raw)
        self._sorted.insert(at, raw)
        self._sorted_weights.insert(at, weight)
        self._recent.append(raw)
        self._recent_weights.append(weight)
        self._mass += weight
        if len(self._recent) > self.window:
            old, old_weight = self._recent.popleft(), self._recent_weights.popleft()
            # equal scores sit in arrival order (inserted on the right), so the oldest of them is the leftmost
            i = bisect_left(self._sorted, old)
            del self._sorted[i]
            del self._sorted_weights[i]
            self._mass -= old_weight

    def quantiles(self, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float]:
        """Raw-score quantiles of the window (by count), for monitoring drift."""
        if not self._sorted:
            return {}
        n = len(self._sorted)
        return {f"p{round(q * 100)}": self._sorted[min(int(q * n), n - 1)] for q in qs}


class PlattScaling:
    """Online Platt scaling of a classifier's probability: ``sigmoid(a * logit(p) + b)``, with ``a`` and ``b``
    fitted to the labels as they arrive.

    For classifiers whose probabilities are far too sure of themselves, such as naive Bayes (its independence
    assumption counts correlated words again and again: Zadrozny and Elkan 2002; Niculescu-Mizil and Caruana
    2005). Learned from the classifier's probability for the labelled event *before* the classifier learns
    that label, so the scaling is fitted on held-out predictions, prequentially.

    Each label takes one Newton step on the log loss, with the Hessian summed over past labels (discounted by
    ``forget`` so the scaling can follow a drifting classifier) and started at the identity, a prior pulling
    towards ``a = 1, b = 0`` (the probability as it is). Plain gradient steps were no use here: a sure
    classifier's logits are large, and a step small enough to be stable took thousands of labels.
    """

    LOGIT_CLIP = 30.0

    def __init__(self, forget: float = 0.999) -> None:
        self.forget = forget
        self.a = 1.0
        self.b = 0.0
        self.h = [1.0, 0.0, 1.0]  # the 2x2 symmetric Hessian: [aa, ab, bb]
        self.labels_seen = 0

    @classmethod
    def logit(cls, p: float) -> float:
        """log(p / (1 - p)), clipped to +-LOGIT_CLIP."""
        if p <= 0.0:
            return -cls.LOGIT_CLIP
        if p >= 1.0:
            return cls.LOGIT_CLIP
        return max(-cls.LOGIT_CLIP, min(cls.LOGIT_CLIP, math.log(p / (1.0 - p))))

    def transform(self, p: float) -> float:
        """The calibrated probability."""
        return _sigmoid(self.a * self.logit(p) + self.b)

    def learn(self, p: float, fraud: bool) -> None:
        """One Newton step towards the label, from the classifier's probability for that event."""
        z = self.logit(p)
        q = _sigmoid(self.a * z + self.b)
        error, curvature = q - float(fraud), max(q * (1.0 - q), 1e-6)
        f = self.forget
        haa = f * self.h[0] + curvature * z * z
        hab = f * self.h[1] + curvature * z
        hbb = f * self.h[2] + curvature
        self.h = [haa, hab, hbb]
        det = haa * hbb - hab * hab
        ga, gb = error * z, error
        self.a -= (hbb * ga - hab * gb) / det
        self.b -= (haa * gb - hab * ga) / det
        self.labels_seen += 1


def _sigmoid(t: float) -> float:
    if t >= 0:
        return 1.0 / (1.0 + math.exp(-t))
    e = math.exp(t)
    return e / (1.0 + e)
