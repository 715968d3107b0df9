"""How detector scores become the model part of the 0-100 risk score (pure; documented in the README).

Every detector gives a calibrated score ``s`` in 0-1: an anomaly detector its rank among recent events, a
population detector its rank among the population it was fitted on, a supervised one its probability of
fraud. A detector still warming up (too few events, labels or no fit yet) counts as ``s = 0``: no evidence.

1. **Model score.** ``M = sqrt(sum(w_i * s_i**2) / sum(w_i))``, the weighted quadratic mean, with ``w_i`` each
   detector's declared ``weight``. The quadratic mean lets one detector that is sure say something even when
   the others are not (an unseen kind of fraud is extreme to the anomaly detector and unknown to the
   supervised one: 1.0 and 0.0 give 0.71, where an arithmetic mean would give 0.5), while agreement still
   ranks highest. On the ULB sample it ranked best of the means we tried (README, "Detection").
2. **Points.** ``weight * clamp((M - floor) / (1 - floor), 0, 1)`` with the subject's ``[combine.SUBJECT]``
   ``weight`` (most points the models may add) and ``floor`` (model scores below it add nothing).
3. **Shares.** Each detector's share of those points is its part of the sum, ``w_i * s_i**2 / sum``: what
   each reason's ``score_delta`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CombineSpec:
    """The model part of one subject's risk score."""

    subject: str
    weight: float = 60.0
    floor: float = 0.6


@dataclass(frozen=True, slots=True)
class DetectorOutput:
    """What the combination needs from one detector."""

    weight: float
    score: float
    warming_up: bool


def model_score(outputs: Sequence[DetectorOutput]) -> float:
    """The weighted quadratic mean of the detectors' scores (warming-up detectors count as 0)."""
    total_weight = sum(o.weight for o in outputs)
    if total_weight <= 0:
        return 0.0
    mass = sum(o.weight * o.score * o.score for o in outputs if not o.warming_up)
    return math.sqrt(mass / total_weight)


def combine(spec: CombineSpec, outputs: Sequence[DetectorOutput]) -> tuple[float, list[float]]:
    """``(model score, each detector's points)``; the points add up to the model part of the risk score."""
    m = model_score(outputs)
    if spec.floor >= 1.0 or m <= spec.floor:
        return m, [0.0] * len(outputs)
    points = spec.weight * min(1.0, (m - spec.floor) / (1.0 - spec.floor))
    masses = [0.0 if o.warming_up else o.weight * o.score * o.score for o in outputs]
    total = sum(masses)
    return m, [points * mass / total for mass in masses]
