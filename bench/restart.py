"""Benchmark what a restart and a policy change cost with history stored: the real ULB transactions in
../shared/data, scored and stored, then

1. saving the state while serving (a forked copy pickles it): how long scoring paused, and the whole save;
2. a restart from the state snapshot of the clean stop, and one rebuilding from the stored events;
3. putting in shadow a version that names one aggregate the running state does not keep: that aggregate is
   replayed from storage while a thread goes on scoring (the longest a payment waited is the stall).

Prints the figures, then one JSON object on the last line.  Usage: python bench/restart.py [--passes N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from bench.payments import bodies, require_stream  # noqa: E402
from risk_engine.config import Settings  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.payments import PaymentIn  # noqa: E402

NEW_AGGREGATE_RULE = """
rule seller_day_volume {
  description "Seller took over 100,000 in the past day"
  when sum(amount.major by seller_id within 1d) > 100000
  then review, reason SELLER_DAY_VOLUME
}
"""


def timed_open(settings: Settings) -> tuple[RiskEngine, float]:
    started = time.perf_counter()
    engine = RiskEngine.open(settings)
    return engine, time.perf_counter() - started


def while_scoring(
    engine: RiskEngine, payments: list[dict[str, object]], action: Callable[[], object]
) -> tuple[float, list[float]]:
    """Run ``action`` while a thread scores ``payments``: (its seconds, each payment's wait in seconds)."""
    waits: list[float] = []
    done = threading.Event()

    def score_meanwhile() -> None:
        for body in payments:
            if done.is_set():
                return
            began = time.perf_counter()
            engine.score_payment(PaymentIn.model_validate(body))
            waits.append(time.perf_counter() - began)

    scorer = threading.Thread(target=score_meanwhile)
    scorer.start()
    time.sleep(0.2)  # under way
    started = time.perf_counter()
    action()
    took = time.perf_counter() - started
    done.set()
    scorer.join()
    return took, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3, help="times over ulb_stream.csv (6,942 payments each)")
    args = parser.parse_args()
    require_stream()
    payload = bodies(args.passes)
    home = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    settings = Settings(home=home, rules_dir=ROOT / "rules", models_dir=ROOT / "models")
    engine = RiskEngine.open(settings)
    committed = None
    for body in payload:
        committed = engine.score_payment(PaymentIn.model_validate(body)).committed
    if committed is not None:
        committed.result()
    during_save = bodies(args.passes + 1)[len(payload) :]  # scored while the state is saved
    save_s, save_waits = while_scoring(engine, during_save, lambda: engine.save_state_snapshot(wait=True))
    payload += during_save[: len(save_waits)]
    started = time.perf_counter()
    engine.close()  # writes the state snapshot
    stop_s = time.perf_counter() - started
    snapshot = settings.snapshot_dir / "state.snapshot"
    snapshot_mb = snapshot.stat().st_size / 1e6

    engine, from_snapshot_s = timed_open(settings)
    text = engine.subjects["payment"].policy.compiled.text + NEW_AGGREGATE_RULE
    later = bodies(args.passes + 2)[len(payload) :]  # payments after the stored ones, scored meanwhile
    shadow_s, waits = while_scoring(engine, later, lambda: engine.set_shadow("payment", text, 1_000))
    engine.set_shadow("payment", None, None)
    engine.close()

    snapshot.unlink()
    engine, rebuilding_s = timed_open(settings)
    engine.close()

    print(f"{len(payload)} stored payments (ulb_stream.csv x {args.passes}, and those scored during the save):")
    print(f"  state saved while serving (forked copy)             {save_s:6.2f} s")
    print(
        f"    scored meanwhile: {len(save_waits)} payments, the longest waited"
        f" {max(save_waits, default=0) * 1e3:.1f} ms"
    )
    print(f"  clean stop (state snapshot written, {snapshot_mb:.1f} MB)   {stop_s:6.2f} s")
    print(f"  restart from the state snapshot                     {from_snapshot_s:6.2f} s")
    print(f"  restart rebuilding from the stored events           {rebuilding_s:6.2f} s")
    print(f"  shadow a version with one new aggregate             {shadow_s:6.2f} s")
    print(f"    scored meanwhile: {len(waits)} payments, the longest waited {max(waits, default=0) * 1e3:.1f} ms")
    figures = {
        "stored_payments": len(payload),
        "save_while_serving_s": round(save_s, 3),
        "scored_during_save": len(save_waits),
        "longest_wait_during_save_ms": round(max(save_waits, default=0) * 1e3, 2),
        "stop_s": round(stop_s, 3),
        "snapshot_mb": round(snapshot_mb, 2),
        "restart_from_snapshot_s": round(from_snapshot_s, 3),
        "restart_rebuilding_s": round(rebuilding_s, 3),
        "shadow_new_aggregate_s": round(shadow_s, 3),
        "scored_meanwhile": len(waits),
        "longest_wait_meanwhile_ms": round(max(waits, default=0) * 1e3, 2),
    }
    print_footer(figures)


if __name__ == "__main__":
    main()
