"""Prometheus metrics: request latency (middleware), decisions, rule hits, detectors and group commits (read at
scrape)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from risk_engine.collector import TUNING
from risk_engine.engine import RiskEngine
from risk_engine.service.bodies import read_body, replay_receive
from risk_engine.service.bursts import Bursts
from risk_engine.service.errors import error_body
from risk_engine.service.responses import send_json

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineCollector(Collector):
    """Counts kept by the engine, exported when Prometheus scrapes (no cost per request)."""

    def __init__(self, engine: RiskEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        decisions = CounterMetricFamily("risk_engine_decisions", "Decisions made, by outcome", labels=["decision"])
        for decision, n in sorted(self.engine.counters.decisions.items()):
            decisions.add_metric([decision], n)
        yield decisions
        hits = CounterMetricFamily("risk_engine_rule_hits", "Times each rule fired", labels=["rule"])
        for rule, n in sorted(self.engine.counters.rule_hits.items()):
            hits.add_metric([rule], n)
        yield hits
        followed = CounterMetricFamily(
            "risk_engine_events_followed",
            "Events other workers stored, taken into this worker's velocity and cross-subject state",
            labels=["subject"],
        )
        for subject, n in sorted(self.engine.counters.followed.items()):
            followed.add_metric([subject], n)
        yield followed
        failures = CounterMetricFamily(
            "risk_engine_model_failures",
            "Times a detector raised, by phase (score, explain, learn, learn_label, rebuild)",
            labels=["model", "phase"],
        )
        for (model, phase), n in sorted(self.engine.counters.detector_failures.items()):
            failures.add_metric([model, phase], n)
        yield failures
        seen = GaugeMetricFamily(
            "risk_engine_model_events_seen", "Events a detector learned from", labels=["model", "version"]
        )
        labels = GaugeMetricFamily(
            "risk_engine_model_labels_seen", "Labels a supervised detector learned from", labels=["model", "version"]
        )
        quantiles = GaugeMetricFamily(
            "risk_engine_model_raw_score", "Raw detector score quantiles (drift)", labels=["model", "quantile"]
        )
        for info in self.engine.models_info():
            seen.add_metric([info["name"], info["version"]], info["events_seen"])
            if info["kind"] == "supervised":
                labels.add_metric([info["name"], info["version"]], info["labels_seen"])
            for q, value in info["score_quantiles"].items():
                quantiles.add_metric([info["name"], q], value)
        yield seen
        yield labels
        yield quantiles
        writer = self.engine.writer
        commits = CounterMetricFamily("risk_engine_group_commits", "Group commits made by the writer")
        commits.add_metric([], writer.batches)
        yield commits
        rows = CounterMetricFamily("risk_engine_group_commit_rows", "Rows written by group commits")
        rows.add_metric([], writer.rows)
        yield rows
        counters = self.engine.counters
        saves = CounterMetricFamily(
            "risk_engine_state_saves",
            "State snapshots saved while serving, by outcome (saved, failed, writer_busy)",
            labels=["outcome"],
        )
        for outcome, n in sorted(counters.state_saves.items()):
            saves.add_metric([outcome], n)
        yield saves
        saved_at = GaugeMetricFamily(
            "risk_engine_state_saved_timestamp_seconds",
            "When the last state snapshot saved while serving was written (Unix time; 0: none yet)",
        )
        saved_at.add_metric([], counters.state_saved_at)
        yield saved_at
        pause = GaugeMetricFamily(
            "risk_engine_state_save_pause_seconds", "How long the last state save held scoring up"
        )
        pause.add_metric([], counters.state_save_pause_s)
        yield pause
        yield from _collector_metrics()


class BurstCollector(Collector):
    """How the scoring fast path's requests were grouped into bursts (``service/bursts.py``)."""

    def __init__(self, bursts: Bursts) -> None:
        self.bursts = bursts

    def collect(self) -> Iterator[Any]:
        runs = CounterMetricFamily("risk_engine_scoring_bursts", "Bursts of scoring requests decided together")
        runs.add_metric([], self.bursts.bursts)
        yield runs
        items = CounterMetricFamily("risk_engine_scoring_burst_requests", "Scoring requests decided in bursts")
        items.add_metric([], self.bursts.items)
        yield items


def _collector_metrics() -> Iterator[Any]:
    """The garbage collector's pauses (process-wide) and what it holds frozen, once tuning is installed."""
    if not TUNING.installed and not TUNING.pauses:
        return
    pauses = HistogramMetricFamily(
        "risk_engine_gc_pause_seconds",
        "Garbage collection pauses (every thread stopped), by generation; 'full' for the periodic full collection",
        labels=["generation"],
    )
    for generation, histogram in sorted(TUNING.pauses.items()):
        pauses.add_metric([generation], histogram.cumulative(), sum_value=histogram.total_s)
    yield pauses
    frozen = GaugeMetricFamily(
        "risk_engine_gc_frozen_objects", "Objects frozen out of the collector's walks (the long-lived state)"
    )
    frozen.add_metric([], gc.get_freeze_count())
    yield frozen


class Metrics:
    """A registry per app, so several apps (tests, workers) never share counters."""

    def __init__(self, engine: RiskEngine) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "risk_engine_request_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine))
        self.latency_series: dict[tuple[str, str, int], Histogram] = {}  # (method, route, status) -> its series


class RequestGuard:
    """Pure ASGI middleware: rejects oversized bodies with 413 and times every request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        limit = self.max_body_bytes
        has_body = False  # a body may follow: a length above 0, or chunks
        declared = False  # its length is declared (the server reads no more than that)
        content_type = encoding = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                    too_big, has_body, declared = length > limit, has_body or length > 0, True
                except ValueError:
                    too_big = True
                if too_big:
                    await _reject_413(send, limit)
                    self._observe(scope, 413, started)
                    return
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
        unsupported = _unsupported_media(has_body, content_type, encoding)
        if unsupported is not None:
            await send_json(send, 415, error_body("unsupported_media_type", unsupported))
            self._observe(scope, 415, started)
            return
        if has_body and not declared:
            # sent in chunks: read here, up to the limit. Refused while the routes read it, the body would be a
            # 400 (FastAPI answers any error raised while it reads a body so)
            body, last = await read_body(receive, limit)
            if last is not None and last["type"] == "http.request":
                await _reject_413(send, limit)
                self._observe(scope, 413, started)
                return
            receive = replay_receive(body, receive, last)

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, tracking_send)
        self._observe(scope, status[0], started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        observe_request(scope, status, started)


def observe_request(scope: Scope, status: int, started: float) -> None:
    """Count a request's latency under its method, route template (``scope["route"]``) and status."""
    app = scope.get("app")
    metrics: Metrics | None = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is None:
        return
    route = scope.get("route")
    path = getattr(route, "path", None) or "unmatched"
    key = (scope["method"], path, status)
    series = metrics.latency_series.get(key)
    if series is None:  # labels() validates and locks on every call: each series is looked up once
        series = metrics.latency_series[key] = metrics.latency.labels(scope["method"], path, str(status))
    series.observe(time.perf_counter() - started)


def _unsupported_media(has_body: bool, content_type: str | None, encoding: str | None) -> str | None:
    """Why a body cannot be read as JSON, or None: every body is JSON (``application/json`` or a ``+json``
    type; none declared is read as JSON), uncompressed. Without this a form-encoded body (what ``curl -d``
    sends unless told otherwise) failed validation as "not an object", and a gzipped one as a parse error."""
    if not has_body:
        return None
    if encoding not in (None, "", "identity"):
        return f"Content-Encoding {encoding} is not accepted: send the JSON body uncompressed"
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            return f"Content-Type must be application/json, not {media or 'empty'}"
    return None


async def _reject_413(send: Send, limit: int) -> None:
    await send_json(send, 413, error_body("too_large", f"request body exceeds {limit} bytes"))
