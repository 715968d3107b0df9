"""What every detector kind shares: its spec, compiled features, and the counters snapshots and restarts use."""

from __future__ import annotations

from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures


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
        self.last_label_id = 0  # id of the last label learned
        self.frauds_seen = 0  # labels that said fraud, of ``labels_seen``

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
