"""Population detectors: pyod models fitted in batch on stored events, then used to score one event fast.

``risk-engine models fit NAME`` reads the subject's recent stored events, computes the detector's features,
fits the pyod estimator and stores the fit (signed) in the database, where every worker picks it up. pyod's
own ``decision_function`` is too slow per request for the ECDF methods (ECOD and COPOD rebuild their ECDFs
from the whole training set on every call: about 0.8 s a row), so a fit keeps each feature's sorted training
column and scores a row with binary searches (``FrozenECDF``), tens of microseconds. HBOS is scored by pyod
(about 0.1 ms a row); IForest too (about 5 ms: meant for batch subjects such as daily merchant roll-ups).

The calibrated score is the raw score's rank among the training rows' scores: 0.99 means "more unusual than
99% of the population it was fitted on".
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from risk_engine.detectors.base import DetectorBase
from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures

ECDF_METHODS = ("ECOD", "COPOD")


class FrozenECDF:
    """Per-feature empirical CDFs of a training set, frozen: ECOD's and COPOD's scores for one new row.

    For a training column with ``n`` values and a new value ``v``: left tail ``(#{x <= v} + 1) / (n + 1)``,
    right tail ``(#{x >= v} + 1) / (n + 1)`` (the new row counted in, as pyod does when it appends the row to
    the training set), then pyod's combination of ``-log`` tails with the column's skewness.
    """

    def __init__(self, X: np.ndarray, method: str) -> None:
        if method not in ECDF_METHODS:
            raise ValueError(f"FrozenECDF scores ECOD or COPOD, not {method}")
        self.method = method
        self.n = int(X.shape[0])
        self.columns = [sorted(float(v) for v in X[:, j]) for j in range(X.shape[1])]
        centred = X - X.mean(axis=0)
        std = X.std(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            skewness = np.nan_to_num((centred**3).mean(axis=0) / std**3)  # scipy.stats.skew, as pyod uses
        self.skew_sign = [int(v) for v in np.sign(skewness)]

    def terms(self, row: Sequence[float]) -> list[float]:
        """Each feature's part of the row's outlier score (the score is their sum)."""
        out = []
        log_n1 = math.log(self.n + 1)
        for column, sign, v in zip(self.columns, self.skew_sign, row, strict=True):
            u_l = log_n1 - math.log(bisect_right(column, v) + 1)
            u_r = log_n1 - math.log(self.n - bisect_left(column, v) + 1)
            if sign < 0:
                u_skew = u_l
            elif sign > 0:
                u_skew = u_r
            else:
                u_skew = u_l + u_r
            if self.method == "ECOD":
                out.append(max(u_l, u_r, u_skew))
            else:  # COPOD
                out.append(max(u_skew, (u_l + u_r) / 2))
        return out

    def score(self, row: Sequence[float]) -> float:
        """The row's outlier score."""
        return sum(self.terms(row))

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        """Scores of many rows at once (vectorised; used to calibrate a fit on its own training rows)."""
        total = np.zeros(X.shape[0])
        log_n1 = math.log(self.n + 1)
        for j, (column, sign) in enumerate(zip(self.columns, self.skew_sign, strict=True)):
            col = np.asarray(column)
            u_l = log_n1 - np.log(np.searchsorted(col, X[:, j], side="right") + 1)
            u_r = log_n1 - np.log(self.n - np.searchsorted(col, X[:, j], side="left") + 1)
            u_skew = u_l if sign < 0 else u_r if sign > 0 else u_l + u_r
            if self.method == "ECOD":
                total += np.maximum(np.maximum(u_l, u_r), u_skew)
            else:
                total += np.maximum(u_skew, (u_l + u_r) / 2)
        return total


@dataclass
class PopulationFit:
    """A fitted population detector: what scoring one event needs."""

    name: str
    digest: str
    fitted_at: datetime
    events: int
    feature_names: list[str]
    reference: list[float]  # the training rows' raw scores, sorted: the calibration
    ecdf: FrozenECDF  # also ranks features for explanations, whatever the estimator
    model: Any = None  # the pyod model, for estimators scored by pyod (HBOS, IForest)

    def raw(self, row: Sequence[float]) -> float:
        """The estimator's outlier score for one row."""
        if self.model is None:
            return self.ecdf.score(row)
        return float(self.model.decision_function(np.asarray([row], dtype=float))[0])

    def calibrate(self, raw: float) -> float:
        """Share of the training rows scored below ``raw`` (ties count half)."""
        ref = self.reference
        below = bisect_left(ref, raw)
        ties = bisect_right(ref, raw) - below
        return (below + 0.5 * ties) / len(ref)


def fit_population(spec: DetectorSpec, X: np.ndarray, fitted_at: datetime) -> PopulationFit:
    """Fit ``spec``'s pyod estimator on ``X`` (rows: events, columns: the spec's features in order)."""
    if X.ndim != 2 or X.shape[0] < 10:
        raise ValueError(f"{spec.name}: need at least 10 events to fit, got {X.shape[0] if X.ndim == 2 else 0}")
    X = np.nan_to_num(X.astype(float))
    method = spec.estimator if spec.estimator in ECDF_METHODS else "ECOD"
    ecdf = FrozenECDF(X, method)
    names = list(spec.features)
    if spec.estimator in ECDF_METHODS:
        reference = ecdf.score_matrix(X)
        model = None
    else:
        model = spec.build()
        model.fit(X)
        reference = np.asarray(model.decision_scores_, dtype=float)
    return PopulationFit(
        spec.name,
        spec.digest,
        fitted_at,
        int(X.shape[0]),
        names,
        sorted(float(v) for v in reference),
        ecdf,
        model,
    )


class PopulationDetector(DetectorBase):
    """A pyod fit behind the streaming detectors' interface: scores once fitted, never learns per event."""

    def __init__(self, spec: DetectorSpec, features: CompiledFeatures) -> None:
        super().__init__(spec, features)
        self.fit: PopulationFit | None = None

    @property
    def version(self) -> str:
        """Declared version, spec digest and, once fitted, when: a refit is a new version."""
        fitted = f".{self.fit.fitted_at:%Y%m%dT%H%M%S}" if self.fit is not None else ".unfitted"
        return f"{self.spec.version}.{self.spec.digest[:8]}{fitted}"

    @property
    def warming_up(self) -> bool:
        """True until fitted."""
        return self.fit is None

    def _row(self, x: Mapping[str, float]) -> list[float]:
        return [float(x.get(name, 0.0)) for name in self.spec.features]

    def score_one(self, x: Mapping[str, float]) -> tuple[float, float]:
        """(raw, calibrated) from the fit; (0, 0) before the first fit."""
        if self.fit is None or not x:
            return 0.0, 0.0
        raw = self.fit.raw(self._row(x))
        return raw, self.fit.calibrate(raw)

    def learn_one(self, x: Mapping[str, float], raw: float, seq: int, weight: float = 1.0) -> None:
        """Counts the event; the model changes only when refitted."""
        self.events_seen += 1
        self.last_seq = seq

    def learn_label(self, x: Mapping[str, float], fraud: bool, label_id: int, defer_refit: bool = False) -> None:
        """Population detectors ignore labels."""

    def explain(self, x: Mapping[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The features in the farthest tails of the population (``-log`` tail probability), largest first."""
        if self.fit is None or not x:
            return []
        terms = self.fit.ecdf.terms(self._row(x))
        ranked = sorted(zip(self.fit.feature_names, terms, strict=True), key=lambda t: -t[1])
        return [(name, round(effect, 4)) for name, effect in ranked[:k] if effect > 0]

    def quantiles(self) -> dict[str, float]:
        """Raw-score quantiles of the fitted population."""
        if self.fit is None:
            return {}
        ref = self.fit.reference
        n = len(ref)
        return {f"p{round(q * 100)}": ref[min(int(q * n), n - 1)] for q in (0.5, 0.9, 0.99)}

    def state(self) -> dict[str, Any]:
        """Snapshot state: the counters (the fit itself lives in the database)."""
        return {
            "name": self.spec.name,
            "digest": self.spec.digest,
            "events_seen": self.events_seen,
            "last_seq": self.last_seq,
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Load counters from a snapshot made for this spec."""
        if state.get("name") != self.spec.name or state.get("digest") != self.spec.digest:
            return False
        self.events_seen = int(state["events_seen"])
        self.last_seq = int(state["last_seq"])
        return True

    def use_fit(self, fit: PopulationFit) -> bool:
        """Start scoring with ``fit``; False (nothing changed) if it was made for another spec."""
        if fit.name != self.spec.name or fit.digest != self.spec.digest:
            return False
        self.fit = fit
        return True
