"""Benchmark how soon one worker counts the payments another worker scored, on PostgreSQL and on SQLite.

Two engines (workers) share a fresh schema of the PostgreSQL at ``RISK_ENGINE_BENCH_POSTGRES_URL`` (default:
127.0.0.1:5432, database ``test``), then a fresh SQLite file. Worker A scores the real ULB payments one at a
time, at uneven intervals; after each answer (committed), the time until worker B's follower has taken that
payment into its velocity windows is measured (the first payment, which B takes in at its poll and which
starts B's SQLite watch, is not counted). Run with B hearing of commits (PostgreSQL: ``NOTIFY`` after each
batch, B listening; SQLite: B watching ``data_version``) and with B's poll alone (every 0.25 s).

Prints the figures, then one JSON object on the last line.  Usage: python bench/follow.py [--payments N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.payments import DATA, require_stream  # noqa: E402
from risk_engine.config import Settings  # noqa: E402
from risk_engine.datasets import ulb_payments  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.payments import PaymentIn  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def lags_ms(url: str, payments: list[dict[str, Any]], heard: bool) -> list[float]:
    """Scores ``payments`` on worker A; returns, for each but the first, how long worker B took to take it in."""
    import risk_engine.engine as engine_module

    real = engine_module.announces, engine_module.commit_watch
    if not heard:  # neither announce nor listen nor watch: the poll alone
        engine_module.announces = lambda db: False
        engine_module.commit_watch = lambda db, origin, stopping, channel: None
    home = Path(tempfile.mkdtemp(prefix="bench-follow-"))
    settings = Settings(
        home=home, database_url=url, rules_dir=ROOT / "rules", models_dir=ROOT / "models", policy_poll_s=3600
    )
    try:
        a = RiskEngine.open(settings)
        b = RiskEngine.open(settings)
    finally:
        engine_module.announces, engine_module.commit_watch = real
    time.sleep(1.0)  # b's follower is listening
    out = []
    try:
        for i, body in enumerate(payments):
            a.score_payment(PaymentIn.model_validate(body)).committed.result()
            started = time.perf_counter()
            while b.counters.followed.get("payment", 0) < i + 1:
                time.sleep(0.0002)
            if i > 0:
                out.append((time.perf_counter() - started) * 1e3)
            time.sleep(0.02 + (i % 7) * 0.013)  # uneven, so the poll's phase varies
    finally:
        b.close()
        a.close()
    return out


def summary(lags: list[float]) -> dict[str, float]:
    ordered = sorted(lags)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=60)
    args = parser.parse_args()
    require_stream()
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    base = os.environ.get("RISK_ENGINE_BENCH_POSTGRES_URL", DEFAULT_URL)
    admin = create_engine(base)
    results: dict[str, Any] = {"payments": args.payments}
    payments = [e.body for e in ulb_payments(DATA / "ulb_stream.csv", prefix="f")][: args.payments + 1]
    for database, heard in (("postgresql", True), ("postgresql", False), ("sqlite", True), ("sqlite", False)):
        schema = "bench_" + uuid.uuid4().hex[:10]
        if database == "sqlite":
            figures = summary(lags_ms(f"sqlite:///{tempfile.mkdtemp(prefix='bench-follow-')}/risk.db", payments, heard))
        else:
            try:
                with admin.begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            except OperationalError as exc:
                sys.exit(f"needs a PostgreSQL at {base}: {type(exc).__name__}")
            try:
                url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
                figures = summary(lags_ms(url, payments, heard))
            finally:
                with admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        mode = ("announced" if database == "postgresql" else "watched") if heard else "polled"
        results.setdefault(database, {})[mode] = figures
        print(
            f"{database:>10} {mode:>9}: another worker counts a payment {figures['median_ms']:.1f} ms after its "
            f"answer (median; p90 {figures['p90_ms']:.1f} ms, max {figures['max_ms']:.1f} ms)"
        )
    admin.dispose()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
