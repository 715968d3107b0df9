"""What every detector kind shares: its spec, compiled features, and the counters snapshots and restarts use."""

from __future__ import annotations

import time

from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures

# On PostgreSQL two workers' labels can commit out of id order: a label id below the last one learned may still
# appear. Such missing ids are looked for again until they turn up or this long has passed (a rolled-back
# insert leaves its id unused for ever). At most MAX_LABEL_GAPS are remembered.
LABEL_GAP_WAIT_S = 120.0
MAX_LABEL_GAPS = 1_000


class DetectorBase:
    """A declared detector's identity and progress counters."""

    def __init__(self, spec: DetectorSpec, features: CompiledFeatures) -> None:
        self.spec = spec
        self.features = features
        # read for every event: plain attributes, not properties over the spec (which never changes)
        self.name = spec.name
        self.supervised = spec.kind == "supervised"  # learns from labels
        self.events_seen = 0
        self.last_seq = -1  # ingest sequence of the last event learned
        self.labels_seen = 0
        self.last_label_id = 0  # highest id of a label learned
        self.label_gaps: dict[int, float] = {}  # ids below it not learned (yet) -> when noticed (time.time())
        self.frauds_seen = 0  # labels that said fraud, of ``labels_seen``

    def wants_label(self, label_id: int) -> bool:
        """True if the label with this id has not been learned: above the last one, or a gap below it."""
        return label_id > self.last_label_id or label_id in self.label_gaps

    def note_label_learned(self, label_id: int) -> None:
        """Move the label watermark past ``label_id``, remembering the ids it skipped as gaps to look for."""
        if label_id <= self.last_label_id:
            self.label_gaps.pop(label_id, None)
            return
        now = time.time()
        for missing in range(max(self.last_label_id + 1, label_id - MAX_LABEL_GAPS), label_id):
            self.label_gaps[missing] = now
        self.last_label_id = label_id
        if len(self.label_gaps) > MAX_LABEL_GAPS:
            for old in sorted(self.label_gaps)[: len(self.label_gaps) - MAX_LABEL_GAPS]:
                del self.label_gaps[old]

    def expire_label_gaps(self, now: float | None = None) -> None:
        """Stop looking for missing label ids noticed more than ``LABEL_GAP_WAIT_S`` ago."""
        limit = (time.time() if now is None else now) - LABEL_GAP_WAIT_S
        for missing in [i for i, at in self.label_gaps.items() if at < limit]:
            del self.label_gaps[missing]

    @property
    def knows_both_outcomes(self) -> bool:
        """True once labels of both kinds, fraud and not fraud, have been learned."""
        return 0 < self.frauds_seen < self.labels_seen

    @property
    def has_opinion(self) -> bool:
        """False for a classifier that has learned one outcome only (it then says 0.5, no opinion)."""
        return not self.supervised or self.knows_both_outcomes

    def select(self, key: object) -> None:
        """Per-key detectors switch to ``key``'s model; others ignore it."""
