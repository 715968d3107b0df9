"""Detector specs: ``models/*.toml`` declare each detector's subject, features and estimator.

[detectors.payment_anomaly]
subject = "payment"
version = 1
kind = "anomaly"                    # anomaly: learns from every event; supervised: from labels;
                                    # population: fitted in batch by `risk-engine models fit NAME`
estimator = "GaussianZScore"        # see ESTIMATORS_BY_KIND
scaler = "none"                     # MinMaxScaler, StandardScaler or "none"
weight = 1                          # its weight in the subject's model score (see detectors/combine.py)
[detectors.payment_anomaly.params]
clip = 5.0
[detectors.payment_anomaly.features]
amount = "log1p(amount.major)"      # any numeric expression of the rules language

[combine.payment]                   # the model part of the payment risk score
weight = 60                         # at most this many points of the 0-100 score
floor = 0.6                         # model scores below this add nothing
anomaly_base_rate = 0.002           # optional: the share of fraud; anomaly ranks then count as evidence
"""

from __future__ import annotations

import hashlib
import inspect
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from risk_engine.dsl import CompiledFeatures, Environment

from risk_engine.detectors.combine import CombineSpec
from risk_engine.dsl.errors import did_you_mean


class SpecError(ValueError):
    """A detector spec that cannot be used."""


@cache  # per-key detectors build a model for every new key
def _river_estimators() -> dict[str, Callable[..., Any]]:
    from river import anomaly, forest, linear_model, naive_bayes, tree

    from risk_engine.detectors.estimators import GaussianZScore, RefittedLogisticRegression, TextNaiveBayes

    return {
        "GaussianZScore": GaussianZScore,
        "HalfSpaceTrees": anomaly.HalfSpaceTrees,
        "OneClassSVM": anomaly.OneClassSVM,
        "LogisticRegression": linear_model.LogisticRegression,
        "RefittedLogisticRegression": RefittedLogisticRegression,
        "HoeffdingTreeClassifier": tree.HoeffdingTreeClassifier,
        "ARFClassifier": forest.ARFClassifier,
        "MultinomialNB": naive_bayes.MultinomialNB,
        "TextNaiveBayes": TextNaiveBayes,
    }


@cache  # per-key detectors build a model for every new key
def _pyod_estimators() -> dict[str, Callable[..., Any]]:
    from pyod.models.copod import COPOD
    from pyod.models.ecod import ECOD
    from pyod.models.hbos import HBOS
    from pyod.models.iforest import IForest

    return {"ECOD": ECOD, "COPOD": COPOD, "HBOS": HBOS, "IForest": IForest}


def estimator_factory(kind: str, estimator: str) -> Callable[..., Any]:
    """The class that builds ``estimator`` (river for streaming kinds, pyod for population)."""
    return (_pyod_estimators() if kind == "population" else _river_estimators())[estimator]


@cache  # per-key detectors build a model for every new key
def _river_scalers() -> dict[str, Callable[..., Any]]:
    from river import preprocessing

    return {"MinMaxScaler": preprocessing.MinMaxScaler, "StandardScaler": preprocessing.StandardScaler}


ESTIMATORS_BY_KIND = {
    "anomaly": ("GaussianZScore", "HalfSpaceTrees", "OneClassSVM"),
    "supervised": (
        "LogisticRegression",
        "RefittedLogisticRegression",
        "HoeffdingTreeClassifier",
        "ARFClassifier",
        "MultinomialNB",
        "TextNaiveBayes",
    ),
    "population": ("ECOD", "COPOD", "HBOS", "IForest"),
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
    kind: str = "anomaly"  # anomaly: learns from every event; supervised: from labels; population: fitted
    weight: float = 1.0
    calibration_window: int = 2000
    warmup: int = 50
    fit_events: int = 50_000  # population detectors: how many recent stored events a fit reads
    text: Mapping[str, str] = field(default_factory=dict)  # supervised text detectors: one string feature
    per: str = ""  # anomaly detectors: a field path; one model per value (a merchant's own series)
    per_max_keys: int = 100_000  # per-key detectors keep the models of this many most recently seen keys
    ngram_range: tuple[int, int] = (1, 2)
    calibration: str = ""  # supervised detectors: "platt" rescales the probability (calibration.PlattScaling)
    source: str = ""
    digest: str = field(default="", compare=False)

    def build(self) -> Any:
        """A fresh estimator: a river pipeline for streaming kinds, an unfitted pyod model for population."""
        if self.estimator == "TextNaiveBayes":  # tokenizes itself
            return estimator_factory(self.kind, self.estimator)(**self.params, ngram_range=self.ngram_range)
        estimator = estimator_factory(self.kind, self.estimator)(**self.params)
        if self.kind == "population":
            return estimator
        if self.text:
            from river import feature_extraction

            (name,) = self.text
            return feature_extraction.BagOfWords(on=name, ngram_range=self.ngram_range) | estimator
        if self.scaler == "none":
            return estimator
        return _river_scalers()[self.scaler]() | estimator


def compile_spec_features(spec: DetectorSpec, env: Environment) -> CompiledFeatures:
    """The spec's features (numeric, and its text feature if any) compiled against a subject's environment."""
    from risk_engine.dsl import compile_features

    return compile_features(
        {**spec.features, **spec.text}, env, f"{spec.source}:{spec.name}", text_names=frozenset(spec.text)
    )


def _check_params(name: str, kind: str, estimator: str, params: Mapping[str, Any], where: str) -> None:
    signature = inspect.signature(estimator_factory(kind, estimator))
    for key in params:
        if key not in signature.parameters:
            hint = did_you_mean(key, signature.parameters)
            raise SpecError(
                f"{where}: detector '{name}': {estimator} has no parameter '{key}'" + (f" ({hint})" if hint else "")
            )


@dataclass(frozen=True)
class ModelsConfig:
    """Everything ``models/`` declares: the detectors and, per subject, how their scores combine."""

    specs: list[DetectorSpec]
    combine: dict[str, CombineSpec]

    def combine_for(self, subject: str) -> CombineSpec:
        """The subject's combination (defaults when its file declares none)."""
        return self.combine.get(subject, CombineSpec(subject))


def _parse_combine(path: Path, data: Mapping[str, Any]) -> dict[str, CombineSpec]:
    tables = data.get("combine", {})
    if not isinstance(tables, dict):
        raise SpecError(f"{path}: [combine.SUBJECT] tables expected")
    result = {}
    for subject, body in tables.items():
        if not isinstance(body, dict):
            raise SpecError(f"{path}: [combine.{subject}] must be a table")
        keys = ("weight", "floor", "anomaly_base_rate")
        unknown = set(body) - set(keys)
        if unknown:
            key = sorted(unknown)[0]
            hint = did_you_mean(key, keys)
            raise SpecError(f"{path}: [combine.{subject}]: unknown key '{key}'" + (f" ({hint})" if hint else ""))
        weight = float(body.get("weight", 60.0))
        floor = float(body.get("floor", 0.6))
        if not 0 <= weight <= 100 or not 0 <= floor < 1:
            raise SpecError(f"{path}: [combine.{subject}]: weight must be in 0..100 and floor in 0..1 (excluded)")
        base_rate = body.get("anomaly_base_rate")
        if base_rate is not None and not (isinstance(base_rate, int | float) and 0 < base_rate < 1):
            raise SpecError(f"{path}: [combine.{subject}]: anomaly_base_rate must be a share between 0 and 1")
        result[subject] = CombineSpec(subject, weight, floor, None if base_rate is None else float(base_rate))
    return result


def parse_spec_file(path: Path) -> list[DetectorSpec]:
    """Read the detectors of one ``models/*.toml`` file. Raises :class:`SpecError` naming file and detector."""
    return _parse_file(path)[0]


def _parse_file(path: Path, check_params: bool = True) -> tuple[list[DetectorSpec], dict[str, CombineSpec]]:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # not TOML, or not UTF-8 text
        raise SpecError(f"{path}: {exc}") from exc
    unknown_tables = set(data) - {"detectors", "combine"}
    if unknown_tables:
        key = sorted(unknown_tables)[0]
        hint = did_you_mean(key, ("detectors", "combine"))
        raise SpecError(f"{path}: unknown table [{key}]" + (f" ({hint})" if hint else ""))
    combine = _parse_combine(path, data)
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
        "calibration_window",
        "calibration",
        "warmup",
        "fit_events",
        "text",
        "ngram_range",
        "per",
        "per_max_keys",
        "description",
    }
    for name, body in detectors.items():
        where = str(path)
        if name.startswith("@"):  # "@attributes" is a key of every stored event's vectors (detectors.vectors)
            raise SpecError(f"{where}: detector '{name}': a detector's name cannot start with '@'")
        unknown = set(body) - known
        if "floor" in unknown:
            subject = body.get("subject", "SUBJECT")
            raise SpecError(f"{where}: detector '{name}': 'floor' is set per subject now, in [combine.{subject}]")
        if unknown:
            key = sorted(unknown)[0]
            hint = did_you_mean(key, known)
            raise SpecError(f"{where}: detector '{name}': unknown key '{key}'" + (f" ({hint})" if hint else ""))
        kind = body.get("kind", "anomaly")
        if kind not in ESTIMATORS_BY_KIND:
            raise SpecError(
                f"{where}: detector '{name}': unknown kind {kind!r}; known: {', '.join(ESTIMATORS_BY_KIND)}"
            )
        estimator = body.get("estimator")
        if estimator in ESTIMATOR_NAMES and estimator not in ESTIMATORS_BY_KIND[kind]:
            owner = next(k for k, names in ESTIMATORS_BY_KIND.items() if estimator in names)
            raise SpecError(
                f"{where}: detector '{name}': {estimator} is not a {kind} estimator but "
                f'{"an" if owner[0] == "a" else "a"} {owner} one (set kind = "{owner}"); '
                f"{kind} estimators: {', '.join(ESTIMATORS_BY_KIND[kind])}"
            )
        if estimator not in ESTIMATOR_NAMES:
            hint = did_you_mean(str(estimator), ESTIMATOR_NAMES)
            raise SpecError(
                f"{where}: detector '{name}': unknown estimator {estimator!r}"
                + (f" ({hint})" if hint else f"; known: {', '.join(ESTIMATOR_NAMES)}")
            )
        scaler = body.get("scaler", "MinMaxScaler" if estimator in ("HalfSpaceTrees", "OneClassSVM") else "none")
        if kind == "population" and scaler != "none":
            raise SpecError(
                f"{where}: detector '{name}': population detectors take no scaler (pyod fits on raw features)"
            )
        if scaler not in SCALER_NAMES:
            raise SpecError(f"{where}: detector '{name}': unknown scaler {scaler!r}; known: {', '.join(SCALER_NAMES)}")
        params = dict(body.get("params", {}))
        if check_params:  # imports the estimator's library (river, pyod: seconds) to read its signature
            _check_params(name, kind, estimator, params, where)
        features = body.get("features", {})
        text = body.get("text", {})
        if not isinstance(text, dict) or not all(isinstance(v, str) for v in text.values()):
            raise SpecError(f"{where}: detector '{name}': [text] must map a name to a string expression")
        if text and (kind != "supervised" or len(text) != 1 or features):
            raise SpecError(
                f"{where}: detector '{name}': a [text] detector is supervised and reads exactly one text feature "
                "(and no numeric ones: declare those in another detector)"
            )
        if not isinstance(features, dict) or not all(isinstance(v, str) for v in features.values()):
            raise SpecError(f"{where}: detector '{name}': [features] must map names to expressions")
        if not features and not text:
            raise SpecError(f"{where}: detector '{name}': [features] must map names to expressions")
        per = body.get("per", "")
        if per and (kind != "anomaly" or not isinstance(per, str)):
            raise SpecError(
                f"{where}: detector '{name}': 'per' (one model per key) is for anomaly detectors, a field path"
            )
        per_max_keys = body.get("per_max_keys", 100_000)
        if not isinstance(per_max_keys, int) or per_max_keys < 1 or ("per_max_keys" in body and not per):
            raise SpecError(f"{where}: detector '{name}': per_max_keys is a positive count, for a 'per' detector")
        ngram = body.get("ngram_range", [1, 2])
        if not (isinstance(ngram, list) and len(ngram) == 2 and all(isinstance(n, int) for n in ngram)) or not (
            1 <= ngram[0] <= ngram[1] <= 5
        ):
            raise SpecError(f"{where}: detector '{name}': ngram_range must be [low, high] with 1 <= low <= high <= 5")
        calibration = body.get("calibration", "")
        if calibration not in ("", "platt") or (calibration and kind != "supervised"):
            raise SpecError(
                f"{where}: detector '{name}': calibration = \"platt\" is the one choice, for supervised detectors "
                "(anomaly detectors are calibrated by rank; see calibration_window)"
            )
        if "subject" not in body:
            raise SpecError(f"{where}: detector '{name}': missing subject")
        weight = float(body.get("weight", 1.0))
        if not 0 <= weight <= 100:
            raise SpecError(f"{where}: detector '{name}': weight must be in 0..100")
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
                calibration_window=int(body.get("calibration_window", 2000)),
                warmup=int(body.get("warmup", 50)),
                fit_events=int(body.get("fit_events", 50_000)),
                text=dict(text),
                per=per,
                per_max_keys=per_max_keys,
                ngram_range=(ngram[0], ngram[1]),
                calibration=calibration,
                source=where,
                digest=hashlib.sha256(canonical.encode()).hexdigest()[:16],
            )
        )
    return specs, combine


def load_models(models_dir: Path, check_params: bool = True) -> ModelsConfig:
    """Every detector and combination declared under ``models_dir``; names must be unique. With
    ``check_params=False`` the estimators' parameters are not checked against their signatures, which spares
    importing river and pyod when only the detectors' names and features are needed (``rules check``)."""
    specs: list[DetectorSpec] = []
    combine: dict[str, CombineSpec] = {}
    for path in sorted(models_dir.glob("*.toml")):
        file_specs, file_combine = _parse_file(path, check_params)
        for spec in file_specs:
            if any(s.name == spec.name for s in specs):
                raise SpecError(f"{path}: detector '{spec.name}' is declared twice")
            specs.append(spec)
        for subject, c in file_combine.items():
            if subject in combine:
                raise SpecError(f"{path}: [combine.{subject}] is declared twice")
            combine[subject] = c
    return ModelsConfig(specs, combine)


def load_specs(models_dir: Path) -> list[DetectorSpec]:
    """Every detector declared under ``models_dir``."""
    return load_models(models_dir).specs
