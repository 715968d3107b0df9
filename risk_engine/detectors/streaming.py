"""A streaming anomaly detector: a river pipeline that scores each event first, then learns from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from risk_engine.detectors.calibration import RunningQuantile
from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures


class StreamingDetector:
    """river estimator + running-quantile calibration, following river's ``score_one``/``learn_one``."""

    def __init__(self, spec: DetectorSpec, features: CompiledFeatures) -> None:
        self.spec = spec
        self.features = features
        self.model = spec.build()
        self._steps = _split(self.model)
        self.calibrator = RunningQuantile(spec.calibration_window, spec.warmup)
        self.events_seen = 0
        self.last_seq = -1

    @property
    def name(self) -> str:
        """The detector's declared name."""
        return self.spec.name

    @property
    def version(self) -> str:
        """Declared version and spec digest: changes whenever the spec does."""
        return f"{self.spec.version}.{self.spec.digest[:8]}"

    def score_one(self, x: Mapping[str, float]) -> tuple[float, float]:
        """(raw, calibrated) for an event, from the state before it."""
        if not x:
            return 0.0, self.calibrator.transform(0.0)
        transformers, estimator = self._steps
        z = x  # river's transformers return new dicts and never change their input
        for t in transformers:
            z = t.transform_one(z)
        raw = float(estimator.score_one(z))
        return raw, self.calibrator.transform(raw)

    def learn_one(self, x: Mapping[str, float], raw: float, seq: int) -> None:
        """Learn from an event after it was scored."""
        if x:
            # what river's Pipeline.learn_one does, without its per-call overhead
            transformers, estimator = self._steps
            z = x
            for t in transformers:
                t.learn_one(z)
                z = t.transform_one(z)
            estimator.learn_one(z)
        self.calibrator.update(raw)
        self.events_seen += 1
        self.last_seq = seq

    def contribution(self, calibrated: float) -> float:
        """Points of the 0-100 risk score: 0 below the floor, rising linearly to ``weight`` at 1.0."""
        floor = self.spec.floor
        if calibrated <= floor:
            return 0.0
        return self.spec.weight * (calibrated - floor) / (1.0 - floor)

    def state(self) -> dict[str, Any]:
        """Everything a snapshot needs to restore this detector exactly."""
        return {
            "name": self.spec.name,
            "digest": self.spec.digest,
            "model": self.model,
            "calibrator": self.calibrator,
            "events_seen": self.events_seen,
            "last_seq": self.last_seq,
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Load a snapshot's state; False (and nothing changed) if it was made for another spec."""
        if state.get("name") != self.spec.name or state.get("digest") != self.spec.digest:
            return False
        self.model = state["model"]
        self._steps = _split(self.model)
        self.calibrator = state["calibrator"]
        self.events_seen = int(state["events_seen"])
        self.last_seq = int(state["last_seq"])
        return True


def _split(model: Any) -> tuple[list[Any], Any]:
    """(transformers, final estimator) of a river pipeline or a bare estimator."""
    steps = list(model.steps.values()) if hasattr(model, "steps") else [model]
    return steps[:-1], steps[-1]
