"""Streaming detectors: river pipelines that score each event with the state before it.

* ``anomaly`` detectors learn from every event right after scoring it; their score is the raw output's rank
  among recent outputs (calibration), so 0.99 means "more unusual than 99% of recent events".
* ``supervised`` detectors learn only when a label arrives, from the feature vector stored with that event's
  decision, so a label never reaches a score made before it arrived; their score is the predicted
  probability of fraud. Their model depends only on the sequence of labels, and the calibrator (kept for
  drift monitoring) only on the sequence of events, so both replay exactly after a restart.
"""

from __future__ import annotations

import pickle
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from risk_engine.detectors.base import DetectorBase
from risk_engine.detectors.calibration import PlattScaling, RunningQuantile
from risk_engine.detectors.estimators import GaussianZScore, RefittedLogisticRegression, TextNaiveBayes
from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures
from risk_engine.watermark import IdWatermark

NO_OPINION = 0.5  # the probability a classifier that knows one outcome only gives


class StreamingDetector(DetectorBase):
    """river estimator + running-quantile calibration, following river's ``score_one``/``learn_one``."""

    def __init__(self, spec: DetectorSpec, features: CompiledFeatures) -> None:
        super().__init__(spec, features)
        self._version = f"{spec.version}.{spec.digest[:8]}"
        self.model = spec.build()
        self._steps = _split(self.model)
        self.calibrator = RunningQuantile(spec.calibration_window, spec.warmup)
        self.platt = PlattScaling() if spec.calibration == "platt" else None
        # per-key detectors (``per``): one model per key, most recently seen last; one calibration for all
        self.models: OrderedDict[str, Any] = OrderedDict()
        self._key: str | None = None
        # what changed since the last snapshot, which holds the rest (``PerKeySnapshot``): the keys whose model
        # is new or learned, when each key seen was last seen (a count of selections), the keys evicted
        self._dirty: set[str] = set()
        self._seen: dict[str, int] = {}
        self._evicted: set[str] = set()
        self._selections = 0
        self._base = PerKeySnapshot()
        self._handed: PerKeyChanges | None = None  # the changes the last ``state`` handed out
        # while serving, a key's model is pickled as it learns (``_learned``), so a snapshot under the state lock
        # has next to nothing to pickle (5,000 reviewers' models took 25 ms there); off while a start rebuilds
        self.pickle_on_learn = False
        self._learned: dict[str, bytes] = {}

    def select(self, key: object) -> None:
        """Per-key detectors: make ``key``'s own model (a fresh one for a new key) the one in use."""
        if not self.spec.per:
            return
        name = str(key)
        models = self.models
        model = models.get(name)
        if model is None:
            model = models[name] = self.spec.build()
            self._dirty.add(name)
            self._evicted.discard(name)
            if len(models) > self.spec.per_max_keys:  # bounded memory: the least recently seen key goes
                gone, _ = models.popitem(last=False)
                self._dirty.discard(gone)
                self._learned.pop(gone, None)
                self._seen.pop(gone, None)
                self._evicted.add(gone)
        else:
            models.move_to_end(name)
        self._seen[name] = self._selections
        self._selections += 1
        self._key = name
        if model is not self.model:
            self.model = model
            self._steps = _split(model)

    def _changed_key(self, key: str) -> None:
        """``key``'s model learned: pickled now while serving, else at the next snapshot."""
        if self.pickle_on_learn:
            self._learned[key] = pickle.dumps(self.model, protocol=pickle.HIGHEST_PROTOCOL)
            self._dirty.discard(key)
        else:
            self._dirty.add(key)

    @property
    def version(self) -> str:
        """Declared version and spec digest: changes whenever the spec does."""
        return self._version

    @property
    def warming_up(self) -> bool:
        """True until the detector has seen enough to be listened to."""
        if self.supervised:
            return self.labels_seen < self.spec.warmup
        return not self.calibrator.warm

    def score_one(self, x: Mapping[str, float]) -> tuple[float, float]:
        """(raw, score) for an event, from the state before it."""
        if not x:
            return 0.0, 0.0 if self.supervised else self.calibrator.transform(0.0)
        transformers, estimator = self._steps
        z = x  # river's transformers return new dicts and never change their input
        for t in transformers:
            z = t.transform_one(z)
        if self.supervised:
            proba = estimator.predict_proba_one(z)
            if (True in proba and False in proba) or self.knows_both_outcomes:
                raw = float(proba.get(True, 0.0))  # a tree's leaf may hold one class only
            else:
                # a classifier that has learned one outcome only may know no other (naive Bayes then says the
                # same for every event): no opinion, as an untrained logistic regression, not certainty
                return NO_OPINION, NO_OPINION
            return raw, raw if self.platt is None else self.platt.transform(raw)
        raw = float(estimator.score_one(z))
        return raw, self.calibrator.transform(raw)

    def learn_one(self, x: Mapping[str, float], raw: float, seq: int, weight: float = 1.0) -> None:
        """Learn from an event after it was scored (a supervised detector waits for its label). ``weight`` is
        the event's sample weight: ``GaussianZScore`` and the calibration count it; other estimators learn the
        event once."""
        if x and not self.supervised:
            # what river's Pipeline.learn_one does, without its per-call overhead
            transformers, estimator = self._steps
            z = x
            for t in transformers:
                t.learn_one(z)
                z = t.transform_one(z)
            if weight != 1.0 and isinstance(estimator, GaussianZScore):
                zw: dict[Hashable, Any] = dict(z.items())
                estimator.learn_one(zw, weight)
            else:
                estimator.learn_one(z)
            if self._key is not None:
                self._changed_key(self._key)
        self.calibrator.update(raw, weight)
        self.events_seen += 1
        self.last_seq = seq

    def explain(self, x: Mapping[str, float], k: int = 3, candidates: int = 8) -> list[tuple[str, float]]:
        """The features that pushed this event's score up most, with how much, largest first.

        Supervised (linear) detectors: each feature's term, weight times its standardized value (with
        ``RefittedLogisticRegression``, its part of the log odds).
        ``GaussianZScore``: each feature's clipped z-score share (the score is their sum). Other anomaly
        detectors: how much the raw score drops when the feature is set to the middle of its observed range;
        only the ``candidates`` features farthest from that middle are tried, to bound the cost.
        """
        if not x:
            return []
        transformers, estimator = self._steps
        z: Mapping[str, float] = x
        for t in transformers:
            z = t.transform_one(z)
        if isinstance(estimator, TextNaiveBayes):
            zt: dict[Hashable, Any] = dict(z.items())
            terms = estimator.gram_effects(zt)
        elif isinstance(estimator, RefittedLogisticRegression):
            zr: dict[Hashable, Any] = dict(z.items())
            terms = [(str(k), v) for k, v in estimator.terms(zr).items()]
        elif self.supervised:
            weights = getattr(estimator, "weights", None)
            if not isinstance(weights, Mapping):
                return []
            terms = [(name, float(weights.get(name, 0.0)) * value) for name, value in z.items()]
        elif isinstance(estimator, GaussianZScore):
            zs: dict[Hashable, Any] = dict(z.items())
            terms = [(str(k), v) for k, v in estimator.terms(zs).items()]  # the score is their sum
        else:
            middle = 0.5 if self.spec.scaler == "MinMaxScaler" else 0.0
            base = float(estimator.score_one(z))
            extreme = sorted(z, key=lambda name: -abs(z[name] - middle))[:candidates]
            terms = [(name, base - float(estimator.score_one({**z, name: middle}))) for name in extreme]
        ranked = sorted((t for t in terms if t[1] > 0), key=lambda t: -t[1])
        return [(name, round(effect, 4)) for name, effect in ranked[:k]]

    def learn_label(self, x: Mapping[str, float], fraud: bool, label_id: int, defer_refit: bool = False) -> None:
        """Learn from a label, with the features the labelled event was scored with. With ``defer_refit``, a
        batch refit that falls due is left for :meth:`complete_refit`, outside the caller's lock."""
        if not self.supervised:
            return
        if x:
            transformers, estimator = self._steps
            z = x
            for t in transformers:
                t.learn_one(z)
                z = t.transform_one(z)
            if self.platt is not None and self.knows_both_outcomes:
                self.platt.learn(float(estimator.predict_proba_one(z).get(True, 0.0)), fraud)
            if isinstance(estimator, RefittedLogisticRegression):
                zr: dict[Hashable, Any] = dict(z.items())
                estimator.learn_one(zr, fraud, refit=not defer_refit)
            else:
                estimator.learn_one(z, fraud)
            if self._key is not None:
                self._changed_key(self._key)
        self.labels_seen += 1
        self.frauds_seen += fraud
        self.labels_read.note(label_id)

    def complete_refit(self, lock: AbstractContextManager[Any]) -> None:
        """Compute a pending batch refit without holding ``lock`` (scoring goes on meanwhile), then install it
        under it. The model stays a function of the labels alone; only when it changes depends on timing."""
        estimator = self._steps[1]
        if not isinstance(estimator, RefittedLogisticRegression):
            return
        with lock:
            rows = estimator.pending
        if rows is None:
            return
        fit = estimator.compute_fit(rows)
        with lock:
            if estimator is self._steps[1]:  # not restored from a snapshot meanwhile
                estimator.install(fit, rows)

    def quantiles(self) -> dict[str, float]:
        """Raw-score quantiles of recent events, for monitoring drift."""
        return self.calibrator.quantiles()

    def state(self) -> dict[str, Any]:
        """Everything a snapshot needs to restore this detector exactly. A per-key detector's models are under
        ``per_key``, a ``PerKeyChanges``: the models changed since the last snapshot, pickled now, and the keys
        seen or evicted since. Its ``apply()`` gives each key's model pickled, in least-recently-seen order, off
        the state lock: call it once per ``state()``, in order, from one thread (the snapshot writer's)."""
        per_key = None
        if self.spec.per:
            models = self.models
            changed = self._learned
            changed.update((key, pickle.dumps(models[key], protocol=pickle.HIGHEST_PROTOCOL)) for key in self._dirty)
            per_key = PerKeyChanges(self._base, changed, self._seen, self._evicted)
            self._learned = {}
            if self._handed is not None and self._handed.taken_over():
                per_key = self._handed.followed_by(per_key)
            self._handed = per_key
            self._dirty, self._seen, self._evicted = set(), {}, set()
        return {
            "name": self.spec.name,
            "digest": self.spec.digest,
            "model": self.model,
            "models": OrderedDict() if self.spec.per else self.models,
            "per_key": per_key,
            "calibrator": self.calibrator,
            "platt": self.platt,
            "events_seen": self.events_seen,
            "last_seq": self.last_seq,
            "last_origin": self.last_origin,
            "labels_seen": self.labels_seen,
            "frauds_seen": self.frauds_seen,
            "last_label_id": self.last_label_id,
            "label_gaps": sorted(self.label_gaps),
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Load a snapshot's state; False (and nothing changed) if it was made for another spec."""
        if state.get("name") != self.spec.name or state.get("digest") != self.spec.digest:
            return False
        self.model = state["model"]
        per_key = state.get("per_key")
        if per_key is not None:  # pickled one by one (within the snapshot, whose signature was checked)
            pickled: dict[str, bytes] = per_key["pickled"]
            order: list[str] = per_key["order"]
            self.models = OrderedDict((key, pickle.loads(pickled[key])) for key in order)
            self._base = PerKeySnapshot({key: pickled[key] for key in order}, {key: i for i, key in enumerate(order)})
            self._dirty, self._seen = set(), {}
        else:  # a plain detector, or a snapshot from before per-key models were pickled one by one
            self.models = OrderedDict(state.get("models", {}))
            self._base = PerKeySnapshot()
            self._dirty, self._seen = set(self.models), {key: i for i, key in enumerate(self.models)}
        self._evicted = set()
        self._handed = None
        self._learned = {}
        self._selections = len(self.models)
        self._key = None
        self._steps = _split(self.model)
        self.calibrator = state["calibrator"]
        self.platt = state.get("platt", self.platt)
        self.events_seen = int(state["events_seen"])
        self.last_seq = int(state["last_seq"])
        self.last_origin = state.get("last_origin")
        self.labels_seen = int(state.get("labels_seen", 0))
        # snapshots from before the count: assume both outcomes once there were two labels
        self.frauds_seen = int(state.get("frauds_seen", 1 if self.labels_seen >= 2 else 0))
        # gaps get a fresh wait after a restart
        self.labels_read = IdWatermark(int(state.get("last_label_id", 0)), state.get("label_gaps", ()))
        return True


class PerKeySnapshot:
    """What the last snapshot of a per-key detector held: each key's model pickled, and when the key was last
    seen. Kept between snapshots so that one under the state lock takes only what changed since (listing and
    copying 100,000 keys' entries under it took 35 ms); changed by ``PerKeyChanges.apply`` alone."""

    def __init__(self, pickled: dict[str, bytes] | None = None, seen: dict[str, int] | None = None) -> None:
        self.pickled: dict[str, bytes] = pickled if pickled is not None else {}
        self.seen: dict[str, int] = seen if seen is not None else {}


class PerKeyChanges:
    """A per-key detector's changes since its last snapshot, taken under the state lock (``state``), for the
    snapshot writer to ``apply``. Changes never applied (a snapshot that failed before its write) are not lost:
    the next ``state`` takes them over, and ``apply`` then gives None here."""

    def __init__(
        self, base: PerKeySnapshot, changed: dict[str, bytes], seen: dict[str, int], evicted: set[str]
    ) -> None:
        self.base = base
        self.changed = changed
        self.seen = seen
        self.evicted = evicted
        self._lock = threading.Lock()
        self._pending = True

    def taken_over(self) -> bool:
        """For the next ``state``: True if these changes were not applied, and will not be (they go with it)."""
        with self._lock:
            pending, self._pending = self._pending, False
            return pending

    def followed_by(self, later: PerKeyChanges) -> PerKeyChanges:
        """These changes, then ``later``'s, as one."""
        # ``apply`` takes the evicted keys out first: a key evicted here and back in ``later`` ends up kept
        changed = {k: v for k, v in self.changed.items() if k not in later.evicted} | later.changed
        seen = {k: v for k, v in self.seen.items() if k not in later.evicted} | later.seen
        return PerKeyChanges(self.base, changed, seen, self.evicted | later.evicted)

    def apply(self) -> dict[str, Any] | None:
        """The snapshot's ``per_key``: ``{"order": keys least recently seen first, "pickled": key -> bytes}``,
        the last snapshot's with these changes made; None if a later ``state`` took them over. What it returns
        is the kept snapshot itself, valid until the next ``apply``: pickle it before."""
        with self._lock:
            if not self._pending:
                return None
            self._pending = False
            base = self.base
            for key in self.evicted:
                base.pickled.pop(key, None)
                base.seen.pop(key, None)
            base.pickled.update(self.changed)
            base.seen.update(self.seen)
            self.changed, self.seen, self.evicted = {}, {}, set()  # in the kept snapshot now
        return {"order": sorted(base.seen, key=base.seen.__getitem__), "pickled": base.pickled}


def _split(model: Any) -> tuple[list[Any], Any]:
    """(transformers, final estimator) of a river pipeline or a bare estimator."""
    steps = list(model.steps.values()) if hasattr(model, "steps") else [model]
    return steps[:-1], steps[-1]
