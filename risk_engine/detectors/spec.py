"""Detector specs: ``models/*.toml`` declare each detector's subject, features and estimator.

[detectors.payment_anomaly]
subject = "payment"
version = 1
estimator = "HalfSpaceTrees"        # river anomaly detector, scored then taught on every event
scaler = "MinMaxScaler"             # MinMaxScaler, StandardScaler or "none"
weight = 20                         # at most this many points of the 0-100 risk score
floor = 0.9                         # calibrated scores below this add nothing
[detectors.payment_anomaly.params]
n_trees = 10
[detectors.payment_anomaly.features]
amount = "log1p(amount.major)"      # any numeric expression of the rules language
"""

from __future__ import annotations

import hashlib
import inspect
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from risk_engine.dsl.errors import did_you_mean


class SpecError(ValueError):
    """A detector spec that cannot be used."""


def _river_estimators() -> dict[str, Callable[..., Any]]:
    from river import anomaly, linear_model, tree

    return {
        "HalfSpaceTrees": anomaly.HalfSpaceTrees,
        "OneClassSVM": anomaly.OneClassSVM,
        "LogisticRegression": linear_model.LogisticRegression,
        "HoeffdingTreeClassifier": tree.HoeffdingTreeClassifier,
    }


def _river_scalers() -> dict[str, Callable[..., Any]]:
    from river import preprocessing

    return {"MinMaxScaler": preprocessing.MinMaxScaler, "StandardScaler": preprocessing.StandardScaler}


ESTIMATORS_BY_KIND = {
    "anomaly": ("HalfSpaceTrees", "OneClassSVM"),
    "supervised": ("LogisticRegression", "HoeffdingTreeClassifier"),
}
ESTIMATOR_NAMES = tuple(name for names in ESTIMATORS_BY_KIND.values() for name in names)
SCALER_NAMES = ("MinMaxScaler", "StandardScaler", "none")


@dataclass(frozen=True)
class DetectorSpec:
    """One declared detector."""

    name: str
    subject: str
    version: int
    estimator: str
    scaler: str
    params: Mapping[str, Any]
    features: Mapping[str, str]
    kind: str = "anomaly"  # anomaly: learns from every event; supervised: learns from labels
    weight: float = 20.0
    floor: float = 0.9
    calibration_window: int = 2000
    warmup: int = 50
    source: str = ""
    digest: str = field(default="", compare=False)

    def build(self) -> Any:
        """A fresh river pipeline for this spec."""
        estimator = _river_estimators()[self.estimator](**self.params)
        if self.scaler == "none":
            return estimator
        return _river_scalers()[self.scaler]() | estimator


def _check_params(name: str, estimator: str, params: Mapping[str, Any], where: str) -> None:
    signature = inspect.signature(_river_estimators()[estimator])
    for key in params:
        if key not in signature.parameters:
            hint = did_you_mean(key, signature.parameters)
            raise SpecError(
                f"{where}: detector '{name}': {estimator} has no parameter '{key}'" + (f" ({hint})" if hint else "")
            )


def parse_spec_file(path: Path) -> list[DetectorSpec]:
    """Read one ``models/*.toml`` file. Raises :class:`SpecError` with the file and detector named."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    detectors = data.get("detectors")
    if not isinstance(detectors, dict) or not detectors:
        raise SpecError(f"{path}: expected one or more [detectors.NAME] tables")
    specs = []
    known = {
        "kind",
        "subject",
        "version",
        "estimator",
        "scaler",
        "params",
        "features",
        "weight",
        "floor",
        "calibration_window",
        "warmup",
        "description",
    }
    for name, body in detectors.items():
        where = str(path)
        unknown = set(body) - known
        if unknown:
            key = sorted(unknown)[0]
            hint = did_you_mean(key, known)
            raise SpecError(f"{where}: detector '{name}': unknown key '{key}'" + (f" ({hint})" if hint else ""))
        kind = body.get("kind", "anomaly")
        if kind not in ESTIMATORS_BY_KIND:
            raise SpecError(f"{where}: detector '{name}': unknown kind {kind!r}; known: anomaly, supervised")
        estimator = body.get("estimator")
        if estimator in ESTIMATOR_NAMES and estimator not in ESTIMATORS_BY_KIND[kind]:
            raise SpecError(
                f"{where}: detector '{name}': {estimator} is not a {kind} estimator; "
                f"{kind} estimators: {', '.join(ESTIMATORS_BY_KIND[kind])}"
            )
        if estimator not in ESTIMATOR_NAMES:
            hint = did_you_mean(str(estimator), ESTIMATOR_NAMES)
            raise SpecError(
                f"{where}: detector '{name}': unknown estimator {estimator!r}"
                + (f" ({hint})" if hint else f"; known: {', '.join(ESTIMATOR_NAMES)}")
            )
        scaler = body.get("scaler", "MinMaxScaler")
        if scaler not in SCALER_NAMES:
            raise SpecError(f"{where}: detector '{name}': unknown scaler {scaler!r}; known: {', '.join(SCALER_NAMES)}")
        params = dict(body.get("params", {}))
        _check_params(name, estimator, params, where)
        features = body.get("features")
        if not isinstance(features, dict) or not features or not all(isinstance(v, str) for v in features.values()):
            raise SpecError(f"{where}: detector '{name}': [features] must map names to expressions")
        if "subject" not in body:
            raise SpecError(f"{where}: detector '{name}': missing subject")
        weight = float(body.get("weight", 20.0))
        floor = float(body.get("floor", 0.9))
        if not 0 <= weight <= 100 or not 0 <= floor < 1:
            raise SpecError(f"{where}: detector '{name}': weight must be in 0..100 and floor in 0..1")
        canonical = repr(sorted((k, repr(v)) for k, v in body.items()))
        specs.append(
            DetectorSpec(
                name=name,
                subject=str(body["subject"]),
                version=int(body.get("version", 1)),
                estimator=estimator,
                kind=kind,
                scaler=scaler,
                params=params,
                features=dict(features),
                weight=weight,
                floor=floor,
                calibration_window=int(body.get("calibration_window", 2000)),
                warmup=int(body.get("warmup", 50)),
                source=where,
                digest=hashlib.sha256(canonical.encode()).hexdigest()[:16],
            )
        )
    return specs


def load_specs(models_dir: Path) -> list[DetectorSpec]:
    """Every detector declared under ``models_dir``; names must be unique."""
    specs: list[DetectorSpec] = []
    for path in sorted(models_dir.glob("*.toml")):
        for spec in parse_spec_file(path):
            if any(s.name == spec.name for s in specs):
                raise SpecError(f"{path}: detector '{spec.name}' is declared twice")
            specs.append(spec)
    return specs
