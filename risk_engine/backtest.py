"""Backtests: replay stored events through a draft and the published policy, with the past as it was.

Events are replayed in the order they were scored. Velocity is rebuilt as the replay goes, so each event
sees exactly the windows it saw live, never the future; detector scores are the ones stored with each
decision. Lists are today's. With the same policy, a backtest gives exactly the decisions live scoring gave;
``live_mismatches`` counts any event where it does not, and the tests hold it at zero.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from risk_engine.dsl import CompiledPolicy, Decision, aggregate_union
from risk_engine.features.velocity import VelocityState
from risk_engine.jobs import Cancelled
from risk_engine.pipeline import decision_for

EXAMPLES_PER_TRANSITION = 10  # the latest events of each changed decision, for an analyst to open one by one


@dataclass(slots=True)  # not frozen: a frozen init costs a setattr call per field, on every replayed event
class StoredEvent:
    """What a backtest needs of a stored event."""

    event_id: str
    record: Mapping[str, Any]
    ts: float
    seq: int
    model_scores: Mapping[str, float]
    model_points: float  # what the detectors added to the live score
    live_policy: str
    live_decision: str
    live_score: int
    fraud: bool | None  # None: no label (yet)


@dataclass
class AlertQuality:
    """How a decision rule does against the labels (an unlabelled event counts as legitimate)."""

    alerts: int = 0
    precision: float | None = None
    recall: float | None = None
    false_positive_rate: float | None = None


@dataclass
class VersionResult:
    """One policy version's replayed decisions."""

    label: str
    decisions: dict[str, int] = field(default_factory=dict)
    rule_hits: dict[str, int] = field(default_factory=dict)
    block: AlertQuality = field(default_factory=AlertQuality)
    block_or_review: AlertQuality = field(default_factory=AlertQuality)


@dataclass
class BacktestReport:
    """Draft against published over the same events."""

    subject: str
    events: int
    labelled: int
    fraud: int
    draft: VersionResult
    published: VersionResult
    changed: int
    transitions: dict[str, int]
    transition_fraud: dict[str, int]  # of each transition's events, how many are labelled fraud
    examples: dict[str, list[dict[str, Any]]]  # per transition, its latest events: id, label, scores, rules fired
    live_mismatches: int
    events_per_s: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def alert_quality(predicted: Sequence[bool], fraud: Sequence[bool]) -> AlertQuality:
    """Precision, recall and false-positive rate of ``predicted`` alerts against ``fraud`` (unlabelled: False)."""
    alerts = sum(predicted)
    caught = sum(p and f for p, f in zip(predicted, fraud, strict=True))
    return quality_of_counts(alerts, caught, sum(fraud), len(fraud))


def quality_of_counts(alerts: int, caught: int, positives: int, events: int) -> AlertQuality:
    """``alert_quality`` from counts: ``alerts`` raised, ``caught`` of them on fraud, ``positives`` frauds among
    ``events``."""
    negatives = events - positives
    false_alerts = alerts - caught
    return AlertQuality(
        alerts=alerts,
        precision=round(caught / alerts, 4) if alerts else None,
        recall=round(caught / positives, 4) if positives else None,
        false_positive_rate=round(false_alerts / negatives, 4) if negatives else None,
    )


def run_backtest(
    subject: str,
    draft: tuple[str, CompiledPolicy],
    published: tuple[str, CompiledPolicy],
    events: Iterable[StoredEvent],
    since_ts: float,
    lists: Mapping[str, AbstractSet[str]],
    progress: Callable[[int], None] | None = None,
    cancelled: threading.Event | None = None,
    max_events_per_key: int = 100_000,
) -> BacktestReport:
    """Replay ``events`` (in scoring order; those before ``since_ts`` only warm the windows up)."""
    started = time.perf_counter()
    policies = (draft[1], published[1])
    velocity = VelocityState(aggregate_union(*(p.aggregates for p in policies)), max_events_per_key)
    results = (VersionResult(draft[0]), VersionResult(published[0]))
    decided: tuple[list[Decision], list[Decision]] = ([], [])
    hit_counts = ([0] * len(policies[0].rules), [0] * len(policies[1].rules))  # by rule index: cheap to bump
    fraud: list[bool] = []
    labelled = mismatches = 0
    n = 0
    live_label = published[0]
    examples: dict[str, deque[dict[str, Any]]] = {}
    transition_fraud: Counter[str] = Counter()
    for event in events:
        aggregates = velocity.query(event.record, event.ts)
        if event.ts >= since_ts:
            points = event.model_points
            outcomes: list[tuple[Decision, int, Sequence[int]]] = []
            for k, policy in enumerate(policies):
                hits = policy.evaluate(event.record, aggregates, lists, event.model_scores)
                decision, score = decision_for(policy, hits, points)
                decided[k].append(decision)
                outcomes.append((decision, score, hits))
                counts = hit_counts[k]
                for i in hits:
                    counts[i] += 1
                if k == 1 and event.live_policy == live_label:
                    # Decision is a StrEnum: it compares equal to the stored text
                    mismatches += decision != event.live_decision or score != event.live_score
            if outcomes[0][0] is not outcomes[1][0]:
                transition = f"{outcomes[1][0].value}->{outcomes[0][0].value}"
                transition_fraud[transition] += bool(event.fraud)
                kept = examples.get(transition)
                if kept is None:
                    kept = examples[transition] = deque(maxlen=EXAMPLES_PER_TRANSITION)
                kept.append(_example(event, policies, outcomes))
            fraud.append(bool(event.fraud))
            labelled += event.fraud is not None
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(n)
            if cancelled is not None and n % 256 == 0 and cancelled.is_set():
                raise Cancelled()
        velocity.add(event.record, event.ts)
    if progress is not None:
        progress(n)  # a finished job's progress is its whole count, not the last thousand it reported
    transitions: Counter[str] = Counter()
    for before, after in zip(decided[1], decided[0], strict=True):
        if before is not after:
            transitions[f"{before.value}->{after.value}"] += 1
    for k, result in enumerate(results):
        result.decisions = dict(Counter(d.value for d in decided[k]))
        named = Counter({policies[k].rules[i].name: c for i, c in enumerate(hit_counts[k]) if c})
        result.rule_hits = dict(named.most_common())
        result.block = alert_quality([d is Decision.BLOCK for d in decided[k]], fraud)
        result.block_or_review = alert_quality([d in (Decision.BLOCK, Decision.REVIEW) for d in decided[k]], fraud)
    elapsed = time.perf_counter() - started
    return BacktestReport(
        subject=subject,
        events=n,
        labelled=labelled,
        fraud=sum(fraud),
        draft=results[0],
        published=results[1],
        changed=sum(transitions.values()),
        transitions=dict(transitions.most_common()),
        transition_fraud={t: transition_fraud[t] for t in transitions},
        examples={t: list(examples[t]) for t in transitions},
        live_mismatches=mismatches,
        events_per_s=round(n / elapsed, 1) if elapsed else 0.0,
    )


def label_name(fraud: bool | None) -> str | None:
    """An event's label as reports show it: fraud, legitimate, or None before any label came."""
    return None if fraud is None else "fraud" if fraud else "legitimate"


def _example(
    event: StoredEvent,
    policies: tuple[CompiledPolicy, CompiledPolicy],
    outcomes: list[tuple[Decision, int, Sequence[int]]],
) -> dict[str, Any]:
    """A changed decision as the report shows it: the event, its label, each version's score and rules."""
    (_, draft_score, draft_hits), (_, published_score, published_hits) = outcomes
    return {
        "event_id": event.event_id,
        "label": label_name(event.fraud),
        "published_score": published_score,
        "draft_score": draft_score,
        "published_rules": [policies[1].rules[i].name for i in published_hits],
        "draft_rules": [policies[0].rules[i].name for i in draft_hits],
    }


def replay_one(
    policy: CompiledPolicy,
    event: StoredEvent,
    stored_aggregates: Mapping[str, Any],
    lists: Mapping[str, AbstractSet[str]],
    history: Iterable[StoredEvent],
    max_events_per_key: int = 100_000,
) -> dict[str, Any]:
    """One stored event through ``policy``, with the windows it saw then: the aggregates stored with it, and
    those only ``policy`` names rebuilt from ``history`` (stored events from the longest such window before it,
    in scoring order; the events scored after it are not counted, as they were not live). Detector points are
    the stored ones; lists are today's."""
    aggregates = dict(stored_aggregates)
    rebuilt = [a for a in policy.aggregates if a.id not in aggregates]
    if rebuilt:
        velocity = VelocityState(rebuilt, max_events_per_key)
        for earlier in history:
            if earlier.seq >= event.seq:
                break
            velocity.add(earlier.record, earlier.ts)
        aggregates.update(velocity.query(event.record, event.ts))
    hits = policy.evaluate(event.record, aggregates, lists, event.model_scores)
    decision, score = decision_for(policy, hits, event.model_points)
    fired = sorted((policy.rules[i] for i in hits), key=lambda r: (r.decision is None, -abs(r.score_delta)))
    return {
        "decision": decision.value,
        "score": score,
        "reasons": [
            {
                "rule": r.name,
                "code": r.code,
                "text": r.text,
                "decision": r.decision.value if r.decision else None,
                "score_delta": r.score_delta,
            }
            for r in fired
        ],
        "model_points": round(event.model_points, 2),
        "rebuilt_aggregates": [a.id for a in rebuilt],
    }
