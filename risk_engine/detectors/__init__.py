"""Detectors: declared in ``models/*.toml``, scored then taught on every event, calibrated to 0-1."""

from risk_engine.detectors.calibration import RunningQuantile
from risk_engine.detectors.snapshot import SnapshotError, read_snapshot, write_snapshot
from risk_engine.detectors.spec import DetectorSpec, SpecError, load_specs
from risk_engine.detectors.streaming import StreamingDetector

__all__ = [
    "DetectorSpec",
    "RunningQuantile",
    "SnapshotError",
    "SpecError",
    "StreamingDetector",
    "load_specs",
    "read_snapshot",
    "write_snapshot",
]
