"""Benchmark backtests: replay the real ULB transactions, stored by live scoring, through the default policy.

First the stream is scored into a fresh SQLite database (as live traffic would have stored it), then the
default policy and a variant of it are backtested over everything stored, on one core.
Prints the figures, then one JSON object on the last line.  Usage: python bench/backtest.py [--passes N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from bench.payments import _pin, bodies, require_stream  # noqa: E402
from risk_engine.config import Settings  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.payments import PaymentIn  # noqa: E402
from risk_engine.policies import PolicyWorkflow  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3, help="times over ulb_stream.csv (6,942 rows each)")
    args = parser.parse_args()
    require_stream()
    logging.disable(logging.WARNING)
    _pin(0)
    home = Path(tempfile.mkdtemp(prefix="bench-backtest-"))
    settings = Settings(home=home, rules_dir=ROOT / "rules", models_dir=ROOT / "models", policy_poll_s=0)
    engine = RiskEngine.open(settings)
    payload = bodies(args.passes)
    t = time.perf_counter()
    tickets = [engine.score_payment(PaymentIn.model_validate(b)).committed for b in payload]
    for ticket in tickets:
        ticket.result()
    stored_s = time.perf_counter() - t
    policy = (ROOT / "rules" / "payment.rules").read_text()
    variant = policy.replace("challenge at 35", "challenge at 30").replace("block at 85", "block at 80")
    workflow = PolicyWorkflow(engine)
    runs = {}
    for name, text in (("same policy", policy), ("variant", variant)):
        t = time.perf_counter()
        report = workflow.backtest("payment", text, name, since_s=10 * 365 * 86400)
        elapsed = time.perf_counter() - t
        runs[name] = {
            "events": report.events,
            "events_per_s": round(report.events / elapsed),
            "replay_events_per_s": report.events_per_s,
            "changed": report.changed,
            "live_mismatches": report.live_mismatches,
            "rules": len(engine.subjects["payment"].policy.compiled.rules),
        }
    engine.close()
    print(f"stored {len(payload)} scored payments in {stored_s:.1f} s")
    for name, r in runs.items():
        print(
            f"  backtest ({name}, {r['rules']} rules): {r['events']} events, {r['events_per_s']} events/s end to end "
            f"(replay alone {r['replay_events_per_s']:.0f}/s), changed {r['changed']}, "
            f"live mismatches {r['live_mismatches']}"
        )
    print_footer({"events": len(payload), "backtest": runs})


if __name__ == "__main__":
    main()
