"""How detector scores become the model part of the 0-100 risk score (pure; documented in the README).

Every detector gives a calibrated score ``s`` in 0-1: an anomaly detector its rank among recent events, a
population detector its rank among the population it was fitted on, a supervised one its probability of
fraud. A detector still warming up (too few events, labels or no fit yet) counts as ``s = 0``: no evidence.

0. **Ranks as evidence** (when the subject declares ``anomaly_base_rate``, the share ``pi`` of events that
   are fraud). A rank ``r`` becomes ``pi / (pi + (1 - r) * (1 - pi))``: the chance that an event is fraud if
   frauds were the most unusual events and nothing else told them apart. A top-1% event (``r = 0.99``) with
   ``pi = 0.002`` counts 0.17, a top-0.1% one 0.67, a top-0.01% one 0.95. Without it a top-5% event already
   counts 0.95: next to a probability of fraud, every mildly unusual event outranks a likely fraud that looks
   ordinary, and the body of the ranking is the anomaly detector's. The rules still see the rank. A
   classifier that has learned one outcome only (it says 0.5 to everything: no opinion) counts as ``pi``
   too, the chance of fraud before any evidence; without a base rate it counts as its 0.5 (where half the
   events are fraud, as in the fake-review corpus, that is the same thing).
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
    anomaly_base_rate: float | None = None  # ranks become evidence (step 0) when set


@dataclass(slots=True)  # not frozen: built per detector per event (a frozen one costs five times as much)
class DetectorOutput:
    """What the combination needs from one detector."""

    weight: float
    score: float
    warming_up: bool
    rank: bool = False  # the score is a rank among events (anomaly, population), not a probability
    opinion: bool = True  # False: a classifier that knows one outcome only, saying 0.5 for everything


def rank_evidence(rank: float, base_rate: float) -> float:
    """Step 0: a rank among events as the chance of fraud if the rarest events were the frauds."""
    return base_rate / (base_rate + (1.0 - rank) * (1.0 - base_rate))


def _weighed(outputs: Sequence[DetectorOutput], base_rate: float | None) -> tuple[float, list[float]]:
    """(model score, each detector's part of the sum) of steps 0 and 1."""
    masses = []
    for o in outputs:
        s = o.score
        if base_rate is not None:
            if o.rank:
                s = rank_evidence(s, base_rate)
            elif not o.opinion:
                s = base_rate
        masses.append(0.0 if o.warming_up else o.weight * s * s)
    total_weight = sum(o.weight for o in outputs)
    return (math.sqrt(sum(masses) / total_weight) if total_weight > 0 else 0.0), masses


def model_score(outputs: Sequence[DetectorOutput], anomaly_base_rate: float | None = None) -> float:
    """The weighted quadratic mean of the detectors' scores (warming-up detectors count as 0)."""
    return _weighed(outputs, anomaly_base_rate)[0]


def combine(spec: CombineSpec, outputs: Sequence[DetectorOutput]) -> tuple[float, list[float]]:
    """``(model score, each detector's points)``; the points add up to the model part of the risk score."""
    m, masses = _weighed(outputs, spec.anomaly_base_rate)
    if spec.floor >= 1.0 or m <= spec.floor:
        return m, [0.0] * len(outputs)
    points = spec.weight * min(1.0, (m - spec.floor) / (1.0 - spec.floor))
    total = sum(masses)
    return m, [points * mass / total for mass in masses]
