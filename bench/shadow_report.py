"""Benchmark the shadow report (``GET /v1/policies/{subject}/shadow``) after a long shadow: the real ULB
transactions in ../shared/data scored ``--passes`` times over (each pass two days later) with a stricter version
in shadow, 2% of them labelled, then the report from the counts kept as events are stored beside a scan of every
shadowed event (how the report was computed before the counts were kept). The two must agree.

Prints the figures, then one JSON object on the last line.  Usage: python bench/shadow_report.py [--passes N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from bench.rule_stats import score_and_label, stream_engine  # noqa: E402
from risk_engine.policies import PolicyWorkflow  # noqa: E402
from tests.test_policies import STRICTER  # noqa: E402  (the default policy, lower thresholds and a rule more)
from tests.test_shadow_tallies import COUNTED, rescan  # noqa: E402  (the full scan the tests hold the counts to)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=15, help="passes over the ULB stream, two days apart")
    args = parser.parse_args()
    engine = stream_engine("bench-shadow-")
    workflow = PolicyWorkflow(engine)
    version = workflow.create_draft("payment", STRICTER, "bench")[0]["version"]
    workflow.start_shadow("payment", version, "bench")
    ids, chosen, scored_s = score_and_label(engine, args.passes)
    print(f"{len(ids):,} payments in shadow stored in {scored_s:.1f} s; {len(chosen):,} labelled")
    timings = []
    for _ in range(3):
        t = time.perf_counter()
        report = workflow.shadow_report("payment")
        timings.append(time.perf_counter() - t)
    t = time.perf_counter()
    scanned = rescan(engine, f"payment:v{version}")
    scan_s = time.perf_counter() - t
    agree = {k: report[k] for k in COUNTED} == scanned
    print(
        f"  {report['events']:,} events, {report['disagreed']:,} decided otherwise in shadow:"
        f" from the counts {min(timings) * 1e3:.1f} ms   scanning every shadowed event {scan_s * 1e3:.1f} ms"
        f"   same figures: {agree}"
    )
    engine.close()
    results: dict[str, Any] = {
        "payments": len(ids),
        "labelled": len(chosen),
        "disagreed": report["disagreed"],
        "report_ms": round(min(timings) * 1e3, 1),
        "scan_ms": round(scan_s * 1e3, 1),
        "agree": agree,
    }
    print_footer(results)


if __name__ == "__main__":
    main()
