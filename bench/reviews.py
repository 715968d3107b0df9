"""Benchmark the review path in-process on the labelled fake-review corpus in ../shared/data.

The corpus, several passes with fresh ids and later times, through the engine pinned to one core: validation,
velocity, the text model and the anomaly detector, the review policy, the order link, near-duplicate texts,
the seller's credit, and durable SQLite writes (group commit), with up to 256 reviews awaiting their commit.
Twice: scoring alone, then with a moderation label for every review arriving 50-100 reviews late (the text
model learning throughout; real moderation labels a small share).

Prints the figures, then one JSON object on the last line.  Usage: python bench/reviews.py [--passes N]
"""

from __future__ import annotations

import argparse
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

from bench.machine import print_footer  # noqa: E402
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


def run(payload: list[tuple[dict[str, Any], int]], labels_every: int) -> dict[str, Any]:
    """Score every review in a fresh engine; with ``labels_every`` > 0, moderation labels for every review
    arrive 50-100 reviews late, in batches of 50."""
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
        if len(pending) > 256:
            pending.popleft().result()
        if labels_every:
            labels.append((body["review_id"], label))
            if len(labels) >= 100:
                batch = [labels.popleft() for _ in range(50)]
                engine.writer.barrier().wait(30)
                engine.record_labels(
                    [(rid, "fake" if y else "genuine", None) for rid, y in batch], source="bench", subject="review"
                )
    while pending:
        pending.popleft().result()
    elapsed = time.perf_counter() - started
    engine.close()
    return {
        "reviews_per_s": round(len(payload) / elapsed),
        "decide_p50_us": round(pct(decide_s, 0.5) * 1e6, 1),
        "decide_p99_us": round(pct(decide_s, 0.99) * 1e6, 1),
        "decide_mean_us": round(statistics.fmean(decide_s) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    payload = events(args.passes)
    scoring = run(payload, labels_every=0)
    learning = run(payload, labels_every=1)
    print("in-process, one core: review policy, text model, anomaly detector, velocity, order and seller state,")
    print(f"near-duplicate texts, seller credit, SQLite durable writes ({len(payload)} reviews)")
    for name, f in (("scoring only", scoring), ("every review labelled", learning)):
        print(
            f"  {name:22s} {f['reviews_per_s']:>6} reviews/s   decide p50 {f['decide_p50_us']:>7} us"
            f"   p99 {f['decide_p99_us']:>8} us"
        )
    print_footer({"data": "opspam_reviews_dev.csv", "reviews": len(payload), "scoring": scoring, "labelled": learning})


if __name__ == "__main__":
    main()
