"""What every detector kind shares: its spec, compiled features, and the counters snapshots and restarts use."""

from __future__ import annotations

from risk_engine.detectors.spec import DetectorSpec
from risk_engine.dsl import CompiledFeatures
from risk_engine.watermark import IdWatermark


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
        # the worker that scored it (None: events of every worker, as a rebuild from storage learns them). A
        # worker numbers its own events only, so a snapshot's sequence means something with its origin alone.
        self.last_origin: str | None = None
        self.labels_seen = 0
        self.labels_read = IdWatermark()  # label ids learned (several workers: some may commit late)
        self.frauds_seen = 0  # labels that said fraud, of ``labels_seen``

    @property
    def last_label_id(self) -> int:
        """The highest id of a label learned."""
        return self.labels_read.last

    @property
    def label_gaps(self) -> dict[int, float]:
        """Label ids below ``last_label_id`` not learned (yet), with when each was noticed."""
        return self.labels_read.gaps

    def wants_label(self, label_id: int) -> bool:
        """True if the label with this id has not been learned: above the last one, or a gap below it."""
        return self.labels_read.wants(label_id)

    def skip_label(self, label_id: int) -> None:
        """Note a label read but not for this detector (another subject's): it is not asked for again."""
        self.labels_read.note(label_id)

    def expire_label_gaps(self, now: float | None = None) -> None:
        """Stop looking for missing label ids noticed long ago (see ``risk_engine.watermark``)."""
        self.labels_read.expire(now)

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
