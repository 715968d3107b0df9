"""Benchmark the payment path on the real ULB transactions in ../shared/data.

1. In-process, pinned to one core: validation, velocity, detector, rules, encryption and durable SQLite writes
   (group commit), with up to 256 payments awaiting their commit, as concurrent requests would be.
   The same again without detectors gives the detectors' cost per event.
2. Over HTTP on loopback, the service and a bare FastAPI endpoint that only validates the same payment model,
   side by side: maximum throughput in alternating rounds (this machine's speed drifts by 10% and more within
   minutes, so each pair of rounds compares the two at one moment; the median pair is the figure), then
   latency at a fixed 1,000 requests/s. Servers on one core, load generator on the other.

Prints the figures, then one JSON object on the last line.  Usage: python bench/payments.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from bench.loadgen import Result, build_request, fixed_rate, max_throughput  # noqa: E402
from bench.machine import print_footer  # noqa: E402
from risk_engine.config import Settings  # noqa: E402
from risk_engine.datasets import ulb_payments  # noqa: E402
from risk_engine.engine import RiskEngine  # noqa: E402
from risk_engine.payments import PaymentIn  # noqa: E402
from risk_engine.storage.writer import Ticket  # noqa: E402


def require_stream() -> None:
    """Exit with what is missing unless the ULB stream is there (``../shared/data`` beside the project)."""
    if not (DATA / "ulb_stream.csv").exists():
        sys.exit(f"needs {DATA / 'ulb_stream.csv'} (../shared/data beside the project)")


def bodies(passes: int) -> list[dict[str, Any]]:
    """The ULB stream, ``passes`` times over, each pass later in time with fresh payment ids."""
    out = []
    for p in range(passes):
        out += [e.body for e in ulb_payments(DATA / "ulb_stream.csv", prefix=f"p{p}", time_offset_s=p * 200_000)]
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by thread name (Linux; empty elsewhere).
    A thread that ends between two readings (a background detector snapshot) is not counted."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[thread.name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def in_process(payload: list[dict[str, Any]], window: int = 256) -> tuple[dict[str, float], Settings]:
    """Score every payment through the engine, durable writes included."""
    home = Path(tempfile.mkdtemp(prefix="bench-"))
    settings = Settings(home=home, rules_dir=ROOT / "rules", models_dir=ROOT / "models")
    engine = RiskEngine.open(settings)
    cpu_before = thread_cpu_s()
    decide_s: list[float] = []
    commit_s: list[float] = []
    pending: deque[tuple[float, Ticket]] = deque()
    started = time.perf_counter()
    for body in payload:
        t0 = time.perf_counter()
        outcome = engine.score_payment(PaymentIn.model_validate(body))
        decide_s.append(time.perf_counter() - t0)
        pending.append((t0, outcome.committed))
        if len(pending) > window:
            t, future = pending.popleft()
            future.result()
            commit_s.append(time.perf_counter() - t)
    while pending:
        t, future = pending.popleft()
        future.result()
        commit_s.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    cpu_after = thread_cpu_s()
    batches = engine.writer.batches
    engine.close()
    cpu_us = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) / len(payload) * 1e6 for name in cpu_after}
    request_path_us = cpu_us.pop("MainThread", 0.0)
    writer_us = cpu_us.pop("risk-engine-writer", 0.0)
    return {
        "cpu_request_path_us": request_path_us,
        "cpu_writer_us": writer_us,
        "cpu_other_threads_us": sum(cpu_us.values()),
        "payments": len(payload),
        "payments_per_s": len(payload) / elapsed,
        "decide_p50_us": pct(decide_s, 0.5) * 1e6,
        "decide_p99_us": pct(decide_s, 0.99) * 1e6,
        "decide_mean_us": statistics.fmean(decide_s) * 1e6,
        "mean_batch": len(payload) / max(batches, 1),
    }, settings


def detector_cost(settings: Settings) -> float:
    """Microseconds per event the default detectors add: features, score, learn, replayed on the stored rows."""
    from sqlalchemy import select

    from risk_engine.detectors import StreamingDetector
    from risk_engine.engine import load_environments
    from risk_engine.storage import models as m
    from risk_engine.storage.db import make_engine

    envs, models, _ = load_environments(settings)
    db = make_engine(settings.resolved_database_url)
    with db.connect() as conn:
        rows = [(r.record, r.aggregates) for r in conn.execute(select(m.Event.record, m.Event.aggregates))]
    db.dispose()
    from risk_engine.dsl import compile_features

    detectors = [
        StreamingDetector(s, compile_features(s.features, envs[s.subject]))
        for s in models.specs
        if s.subject == "payment"
    ]
    started = time.perf_counter()
    for i, (record, aggregates) in enumerate(rows):
        for det in detectors:
            x = det.features.compute(record, aggregates, {}, {})
            raw, _ = det.score_one(x)
            det.learn_one(x, raw, i)
    return (time.perf_counter() - started) / len(rows) * 1e6


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx2 as httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def serve(kind: str) -> tuple[subprocess.Popen[bytes], int, str | None]:
    """Start the service or the bare endpoint on CPU 0; returns (process, port, api key)."""
    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    env = {
        **os.environ,
        "RISK_ENGINE_HOME": str(home),
        "RISK_ENGINE_RULES_DIR": str(ROOT / "rules"),
        "RISK_ENGINE_MODELS_DIR": str(ROOT / "models"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("RISK_ENGINE_DATABASE_URL", None)
    if kind == "service":
        cmd = [
            sys.executable,
            "-m",
            "risk_engine.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "bare_app.py"), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: _pin(0)
    )
    _wait_healthy(port, proc)
    key = (home / "admin.key").read_text().strip() if kind == "service" else None
    return proc, port, key


def endless_requests(key: str | None) -> Iterator[bytes]:
    """The ULB stream over and over, each pass later in time and with fresh payment ids: never a replay."""
    for p in itertools.count():
        for event in ulb_payments(DATA / "ulb_stream.csv", prefix=f"h{p}", time_offset_s=p * 200_000):
            yield build_request("/v1/payments/score", orjson.dumps(event.body), key)


def http_compare(rounds: int, seconds: float) -> tuple[dict[str, dict[str, float]], list[float]]:
    """The service and the bare endpoint up side by side, both on CPU 0: maximum throughput in ``rounds``
    alternating pairs (service first, then bare first, and so on), so that both meet the machine at the same
    moments; then p50/p99 at 1,000 requests/s for each. Returns each server's figures (its median round) and
    each pair's service/bare throughput."""
    started: list[tuple[subprocess.Popen[bytes], int, str | None]] = []
    try:
        started += [serve("service"), serve("bare")]  # each stopped below, even if the other does not start
        streams = {"service": endless_requests(started[0][2]), "bare": endless_requests(None)}
        ports = {"service": started[0][1], "bare": started[1][1]}
        tops: dict[str, list[Result]] = {"service": [], "bare": []}
        for kind in ports:  # warm-up, then the measured runs on fresh payments
            asyncio.run(max_throughput(ports[kind], streams[kind], 8, 1.0))
        for r in range(rounds):
            for kind in ("service", "bare") if r % 2 == 0 else ("bare", "service"):
                tops[kind].append(asyncio.run(max_throughput(ports[kind], streams[kind], 32, seconds)))
        out: dict[str, dict[str, float]] = {}
        for kind, port in ports.items():
            top = sorted(tops[kind], key=lambda t: t.rate())[len(tops[kind]) // 2]
            steady = asyncio.run(fixed_rate(port, streams[kind], 1000.0, max(seconds, 5.0), 64))
            out[kind] = {
                "max_rps": top.rate(),
                "max_p50_ms": top.percentile(0.5) * 1e3,
                "max_p99_ms": top.percentile(0.99) * 1e3,
                "errors": sum(t.errors for t in tops[kind]) + steady.errors,
                "at_1000_rps_p50_ms": steady.percentile(0.5) * 1e3,
                "at_1000_rps_p99_ms": steady.percentile(0.99) * 1e3,
                "at_1000_rps_achieved": steady.rate(),
            }
        shares = [s.rate() / b.rate() if b.rate() else 0.0 for s, b in zip(tops["service"], tops["bare"], strict=True)]
    finally:
        for proc, _, _ in started:
            proc.terminate()
            proc.wait(10)
    return out, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer payments and shorter HTTP runs")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    require_stream()
    passes = 1 if args.quick else 3
    payload = bodies(passes)
    results: dict[str, Any] = {"data": "ulb_stream.csv", "payments_in_process": len(payload)}

    _pin(0)
    full, settings = in_process(payload)
    detector_us = detector_cost(settings)
    print("in-process, one core, default policy + detector + velocity, SQLite durable writes (group commit):")
    print(
        f"  {full['payments_per_s']:8.0f} payments/s   decide p50 {full['decide_p50_us']:6.0f} us"
        f"   p99 {full['decide_p99_us']:6.0f} us   mean commit batch {full['mean_batch']:.0f}"
    )
    if full["cpu_request_path_us"]:  # read from /proc: not measured elsewhere
        print(
            f"  CPU per payment: request path {full['cpu_request_path_us']:.0f} us, writer thread"
            f" {full['cpu_writer_us']:.0f} us, other threads {full['cpu_other_threads_us']:.0f} us"
        )
    print(f"  detector cost (features + score + learn): {detector_us:.1f} us per event")
    results["in_process"] = {
        "payments_per_s": round(full["payments_per_s"]),
        "decide_p50_us": round(full["decide_p50_us"], 1),
        "decide_p99_us": round(full["decide_p99_us"], 1),
        "detector_us_per_event": round(detector_us, 1),
    }
    if full["cpu_request_path_us"]:
        results["in_process"]["cpu_us_per_payment"] = {
            "request_path": round(full["cpu_request_path_us"], 1),
            "writer": round(full["cpu_writer_us"], 1),
            "other_threads": round(full["cpu_other_threads_us"], 1),
        }

    if not args.skip_http:
        _pin(1)
        rounds, seconds = (1, 3.0) if args.quick else (5, 5.0)
        figures, shares = http_compare(rounds, seconds)
        service, baseline = figures["service"], figures["bare"]
        share = statistics.median(shares)
        print("over HTTP on loopback (uvicorn, one worker on one core; load generator on the other):")
        for name, r in (("service", service), ("bare FastAPI", baseline)):
            print(
                f"  {name:13s} max {r['max_rps']:7.0f} req/s (its median round; p50 {r['max_p50_ms']:5.1f} ms, p99 "
                f"{r['max_p99_ms']:5.1f} ms)   at 1,000 req/s: p50 {r['at_1000_rps_p50_ms']:5.2f} ms, "
                f"p99 {r['at_1000_rps_p99_ms']:5.2f} ms   errors {r['errors']}"
            )
        print(
            f"  service / bare throughput: {share:.0%} (median of {len(shares)} alternating pairs of"
            f" {seconds:.0f} s rounds: {', '.join(f'{x:.0%}' for x in shares)})"
        )
        results["http"] = {
            "service": {k: round(v, 2) for k, v in service.items()},
            "bare": {k: round(v, 2) for k, v in baseline.items()},
            "throughput_share_of_bare": round(share, 3),
            "throughput_share_by_pair": [round(x, 3) for x in shares],
        }
    _pin(0)
    print_footer(results)


if __name__ == "__main__":
    main()
