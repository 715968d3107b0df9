"""Feature vectors as stored with each event, without repeating what its record already holds.

Each event's row keeps the vectors its detectors scored it with: labels arrive later and teach the supervised
detectors with them, a restart replays them after a snapshot, fits and the event view read them. A feature that
is a caller attribute of the same name, unchanged (``V1 = "attributes.V1"``: 28 of each default payment
detector's features on the ULB data), is the record's own value, so the row names it under :data:`ELIDED`
instead of storing its value again (a detector eliding the same names as one before it names that one);
:func:`stored_vector` puts the values back from the record, in the detector's feature order, as
:meth:`CompiledFeatures.compute` made them. Rows stored before hold whole vectors and no :data:`ELIDED`, and read
as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from risk_engine.detectors.base import DetectorBase
from risk_engine.schema import ATTRIBUTES_PREFIX

# {detector: [feature names read from the record], or the name of an earlier detector eliding the same ones}; no
# detector may take this name
ELIDED = "@attributes"


class VectorPacker:
    """Packs a subject's detector vectors into the ``features`` column (built once per set of detectors)."""

    def __init__(self, detectors: Iterable[DetectorBase]) -> None:
        self._plan: list[tuple[str, tuple[str, ...] | None]] = []  # (detector, names kept) or None: all kept
        elided: dict[str, tuple[str, ...] | str] = {}
        first: dict[tuple[str, ...], str] = {}  # detectors eliding the same names: the later ones name the first
        for det in detectors:
            names = det.features.attribute_names
            if not names:
                self._plan.append((det.name, None))
                continue
            self._plan.append((det.name, det.features.kept_names))
            same = first.setdefault(names, det.name)
            elided[det.name] = names if same == det.name else same
        self._elided = elided

    def pack(self, vectors: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The ``features`` column for an event: each vector, its attribute copies named, not valued."""
        out: dict[str, Any] = {}
        for name, kept in self._plan:
            x = vectors[name]
            out[name] = x if kept is None else {feature: x[feature] for feature in kept if feature in x}
        if self._elided:
            out[ELIDED] = self._elided
        return out


def stored_vector(
    features: Mapping[str, Any] | None, name: str, record: Mapping[str, Any], order: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Detector ``name``'s vector as the event was scored with it (None if the row has none), from the row's
    ``features`` and ``record``; in ``order`` (the detector's feature names) when it holds them all."""
    if not features:
        return None
    kept = features.get(name)
    if kept is None:
        return None
    elided = features.get(ELIDED)
    if not isinstance(elided, Mapping):
        return dict(kept)
    names = elided.get(name)
    if isinstance(names, str):  # the same names as that detector's
        names = elided.get(names)
    if not names:
        return dict(kept)
    x = dict(kept)
    for feature in names:
        value = record.get(ATTRIBUTES_PREFIX + feature)
        if value is not None:
            # as the compiled features convert it: a value that would not convert was left out (no
            # contextlib.suppress: a restart reads this for every feature of every event it replays)
            try:  # noqa: SIM105
                x[feature] = float(value)
            except (TypeError, ValueError, OverflowError):
                pass
    if order:
        ordered = {feature: x[feature] for feature in order if feature in x}
        if len(ordered) == len(x):
            return ordered
    return x


def stored_vectors(
    features: Mapping[str, Any] | None, record: Mapping[str, Any], orders: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """Every detector's vector in a row (see :func:`stored_vector`), by detector name."""
    out: dict[str, dict[str, Any]] = {}
    for name in features or {}:
        if name != ELIDED:
            x = stored_vector(features, name, record, orders.get(name, ()))
            if x is not None:
                out[name] = x
    return out
