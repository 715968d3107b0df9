"""Benchmark the rule statistics read (``GET /v1/policies/{subject}/rules/stats``) with a month of history: the
real ULB transactions in ../shared/data, scored ``--passes`` times over (each pass two days later, 15 passes: 30
days), 2% of them labelled, then the read of 2 and 30 days from the hourly counts beside a scan of every event
of the window (how the statistics were counted before the counts were kept). The two must agree.

Prints the figures, then one JSON object on the last line.  Usage: python bench/rule_stats.py [--passes N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from bench.payments import DATA, require_stream  # noqa: E402
from risk_engine.config import Settings  # noqa: E402
from risk_engine.datasets import ulb_payments  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.payments import PaymentIn  # noqa: E402
from tests.test_rule_hits import counted, recount  # noqa: E402  (the full scan the tests hold the counts to)


def score_and_label(engine: RiskEngine, passes: int) -> tuple[list[str], list[str], float]:
    """Score the ULB stream ``passes`` times over, two days apart, then label 2% of it at random (fixed seed).
    Returns (the payment ids, those labelled, seconds taken to score and store them)."""
    ids: list[str] = []
    started = time.perf_counter()
    for p in range(passes):
        for event in ulb_payments(DATA / "ulb_stream.csv", prefix=f"p{p}", time_offset_s=p * 172_800):
            engine.score_payment(PaymentIn.model_validate(event.body))
            ids.append(event.body["payment_id"])
    engine.writer.barrier().result()
    scored_s = time.perf_counter() - started
    rng = random.Random(7)
    chosen = rng.sample(ids, len(ids) // 50)
    for start in range(0, len(chosen), 500):
        engine.record_labels(
            [(pid, rng.choice(["chargeback", "legitimate"]), None) for pid in chosen[start : start + 500]], "bench"
        )
    return ids, chosen, scored_s


def stream_engine(prefix: str) -> RiskEngine:
    """An engine on a fresh data directory (named from ``prefix``) with the default policy and detectors; exits
    first if the ULB stream is missing."""
    require_stream()
    home = Path(tempfile.mkdtemp(prefix=prefix))
    return RiskEngine.open(Settings(home=home, rules_dir=ROOT / "rules", models_dir=ROOT / "models"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=15, help="passes over the ULB stream, two days apart")
    args = parser.parse_args()
    engine = stream_engine("bench-stats-")
    ids, chosen, scored_s = score_and_label(engine, args.passes)
    print(f"{len(ids):,} payments over {args.passes * 2} days stored in {scored_s:.1f} s; {len(chosen):,} labelled")
    results: dict[str, Any] = {"payments": len(ids), "labelled": len(chosen), "reads": {}}
    for days in (2, 30):  # (with 1, the window's figure and the day's share one key in the answer)
        timings = []
        for _ in range(3):
            t = time.perf_counter()
            from_counts = counted(engine, "payment", days)
            timings.append(time.perf_counter() - t)
        t = time.perf_counter()
        from_scan = recount(engine, "payment", days)
        scan_s = time.perf_counter() - t
        agree = from_counts == from_scan
        print(
            f"  {days:2d} days: from the hourly counts {min(timings) * 1e3:8.1f} ms   scanning every event"
            f" {scan_s * 1e3:8.1f} ms   same figures: {agree}"
        )
        results["reads"][f"{days}d"] = {
            "counts_ms": round(min(timings) * 1e3, 1),
            "scan_ms": round(scan_s * 1e3, 1),
            "agree": agree,
        }
    engine.close()
    print_footer(results)


if __name__ == "__main__":
    main()
