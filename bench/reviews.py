"""Benchmark the review path in-process on the labelled fake-review corpus in ../shared/data.

The corpus, several passes with fresh ids and later times, through the engine pinned to one core: validation,
velocity, the text model and the anomaly detector, the review policy, encryption of the reviewer's IP and
durable SQLite writes (group commit), with up to 256 reviews awaiting their commit. Moderation labels arrive 50
reviews late, so the text model is learning (and scoring with what it learned) throughout.

Prints the figures, then one JSON object on the last line.  Usage: python bench/reviews.py [--passes N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from risk_engine.config import Settings  # noqa: E402
from risk_engine.datasets import opspam_reviews  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.reviews import ReviewIn  # noqa: E402
from risk_engine.storage.writer import Ticket  # noqa: E402


def events(passes: int) -> list[tuple[dict[str, Any], int]]:
    """The corpus ``passes`` times over, each pass later in time with fresh ids."""
    out = []
    for p in range(passes):
        for e in opspam_reviews(DATA / "opspam_reviews_dev.csv", prefix=f"p{p}"):
            body = dict(e.body)
            body["occurred_at"] = body["occurred_at"].replace("2011-", f"{2011 + p}-")
            out.append((body, e.label))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    payload = events(args.passes)
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="bench-reviews-")), policy_poll_s=0)
    engine = RiskEngine.open(settings)
    decide_s: list[float] = []
    pending: deque[Ticket] = deque()
    labels: deque[tuple[str, int]] = deque()
    started = time.perf_counter()
    for body, label in payload:
        t0 = time.perf_counter()
        outcome = engine.score_event("review", ReviewIn.model_validate(body))
        decide_s.append(time.perf_counter() - t0)
        pending.append(outcome.committed)
        labels.append((body["review_id"], label))
        if len(pending) > 256:
            pending.popleft().result()
        if len(labels) >= 100:  # moderation outcomes, 50-100 reviews late, in batches
            batch = [labels.popleft() for _ in range(50)]
            engine.writer.barrier().wait(30)
            engine.record_labels(
                [(rid, "fake" if y else "genuine", None) for rid, y in batch], source="bench", subject="review"
            )
    while pending:
        pending.popleft().result()
    elapsed = time.perf_counter() - started
    engine.close()
    figures = {
        "data": "opspam_reviews_dev.csv",
        "reviews": len(payload),
        "reviews_per_s": round(len(payload) / elapsed),
        "decide_p50_us": round(pct(decide_s, 0.5) * 1e6, 1),
        "decide_p99_us": round(pct(decide_s, 0.99) * 1e6, 1),
        "decide_mean_us": round(statistics.fmean(decide_s) * 1e6, 1),
    }
    print("in-process, one core: review policy + text model + anomaly detector + velocity, SQLite durable writes")
    print(
        f"  {figures['reviews_per_s']:>8} reviews/s   decide p50 {figures['decide_p50_us']:>7} us"
        f"   p99 {figures['decide_p99_us']:>8} us   ({figures['reviews']} reviews, labels 50-100 late)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
