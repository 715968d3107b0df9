"""Rule hits counted per hour as events are stored, so the rule statistics read hours, not events.

``rule_hits`` holds, per (subject, hour of the event's time, reason code, worker), how many stored events a rule
with that code fired on, how many of those have a label, and how many of those were labelled fraud:

- hits are added by the group-commit writer in the transaction that stores the events (``HitTally``), so a
  count is never ahead of or behind what is stored, whatever fails;
- the label columns move when a label changes an event's outcome (none to legitimate or fraud, legitimate to
  fraud: an outcome is fraud once any label says so), in the label's transaction (``tally_labels``);
- each worker adds to rows of its own (``origin``), so workers never wait on each other's counts; a read sums
  them.

Before this table existed the counts were a scan of every event in the window; migration 0014 fills it from the
stored events once (``backfill``). A shadow version's decisions are counted the same way, beside them
(``storage/shadow_tallies.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text, tuple_
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage import shadow_tallies
from risk_engine.storage.counts import add_counts
from risk_engine.storage.labels import EVENT_OUTCOME_SQL, event_outcome
from risk_engine.storage.shadow_tallies import ShadowOutcome

HOUR_S = 3600
EVENTS_PER_READ = 500  # events read back per statement when labels are tallied


def hour_of(ts: float) -> int:
    """The hour bucket of a Unix time."""
    return int(ts // HOUR_S)


def rule_codes(answer: dict[str, Any]) -> tuple[str, ...]:
    """The reason codes of the rules that fired, from an event's answer: one per rule (two rules with one code
    count twice, as the statistics always counted them)."""
    return tuple(r["code"] for r in answer.get("reasons", ()) if r.get("source") == "rule")


@dataclass(frozen=True, slots=True)
class Tally:
    """What an event stored adds to the counts: its rule hits and, if a shadow version decided it too, that."""

    subject: str
    hour: int
    codes: tuple[str, ...]
    shadow: ShadowOutcome | None = None


class HitTally:
    """The statements the writer runs in a batch's transaction to add that batch's rule hits and shadow
    decisions."""

    def __init__(self, engine: Engine, origin: str) -> None:
        self.origin = origin
        self._marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._head = "INSERT INTO rule_hits (subject, hour, code, origin, hits, labelled, fraud) VALUES "
        self._tail = " ON CONFLICT (subject, hour, code, origin) DO UPDATE SET hits = rule_hits.hits + excluded.hits"

    def execute(self, cursor: Any, tallies: Iterable[Tally]) -> None:
        """Add one hit per (subject, hour, code) of each tally, and each tally's shadow decision."""
        counts: Counter[tuple[str, int, str]] = Counter()
        shadows: list[ShadowOutcome] = []
        for tally in tallies:
            for code in tally.codes:
                counts[tally.subject, tally.hour, code] += 1
            if tally.shadow is not None:
                shadows.append(tally.shadow)
        if counts:
            group = "(" + ", ".join([self._marker] * 5) + ", 0, 0)"
            sql = self._head + ", ".join(group for _ in counts) + self._tail
            params: list[Any] = []
            for (subject, hour, code), n in sorted(counts.items()):  # one order: no two batches lock crosswise
                params += (subject, hour, code, self.origin, n)
            cursor.execute(sql, tuple(params))
        # after the rule rows, as a label's transaction takes them (``tally_labels``): a batch and a label of
        # one worker add to the same rows, and taken crosswise PostgreSQL fails one of them as a deadlock
        shadow_tallies.add(cursor, self._marker, self.origin, shadows)


def tally_labels(session: Session, labels: Sequence[m.Label], origin: str) -> None:
    """In the transaction that adds ``labels`` (added, not yet committed): move the label counts of the rules
    that fired on each labelled event whose outcome they change, and of its shadow decision, if it has one.

    The labels are flushed first, so on SQLite the write lock is held from then on; on PostgreSQL each event's
    row is locked before its outcome is read. Either way the outcome read before these labels is the latest
    committed one, and two transactions labelling one event count its change once."""
    if not labels:
        return
    session.flush()
    new_ids = [row.id for row in labels]
    added: dict[tuple[str, str], bool] = {}
    for row in labels:
        key = (row.subject, row.event_id)
        added[key] = added.get(key, False) or bool(row.is_fraud)
    keys = sorted(added)
    changes: Counter[tuple[str, int, str, str]] = Counter()
    shadowed: dict[tuple[str, str, str], tuple[int, int]] = {}
    for start in range(0, len(keys), EVENTS_PER_READ):
        chunk = keys[start : start + EVENTS_PER_READ]
        prior = event_outcome(excluding=new_ids)
        chosen = tuple_(m.Event.subject, m.Event.event_id).in_(chunk)
        # locked first, then read in a statement of its own: on PostgreSQL a statement reads what was committed
        # when it began, so an outcome read in the locking statement itself would miss the labels of a
        # transaction it waited for
        session.execute(select(m.Event.id).where(chosen).order_by(m.Event.id).with_for_update()).all()
        e = m.Event
        stmt = select(e.subject, e.event_id, e.occurred_at, e.response, e.decision, e.shadow, prior).where(chosen)
        for subject, event_id, occurred_at, answer, live, shadow, was in session.execute(stmt):
            fraud_now = added[subject, event_id]
            labelled_delta = 1 if was is None else 0
            fraud_delta = 1 if fraud_now and not was else 0
            if not (labelled_delta or fraud_delta):
                continue
            hour = hour_of(occurred_at.timestamp())
            for code in rule_codes(answer):
                changes[subject, hour, code, "labelled"] += labelled_delta
                changes[subject, hour, code, "fraud"] += fraud_delta
            decided = ShadowOutcome.of(live, shadow)
            if decided is not None:
                pair = (decided.version, decided.live, decided.shadow)
                labelled, fraud = shadowed.get(pair, (0, 0))
                shadowed[pair] = (labelled + labelled_delta, fraud + fraud_delta)
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for (subject, hour, code, column), n in changes.items():
        counted = rows.setdefault(
            (subject, hour, code),
            {"subject": subject, "hour": hour, "code": code, "origin": origin, "hits": 0, "labelled": 0, "fraud": 0},
        )
        counted[column] += n
    # the rule rows first, then the shadow's, as the writer's batches take them (``HitTally``)
    add_counts(
        session,
        m.RuleHit,
        ("subject", "hour", "code", "origin"),
        ("hits", "labelled", "fraud"),
        [rows[k] for k in sorted(rows)],
    )
    shadow_tallies.label_changes(session, shadowed, origin)


def counts(session: Session, subject: str, first_hour: int, end_hour: int) -> dict[str, list[int]]:
    """Per reason code, ``[hits, labelled, fraud]`` summed over the hours ``first_hour <= h < end_hour``."""
    out: dict[str, list[int]] = {}
    stmt = (
        select(m.RuleHit.code, func.sum(m.RuleHit.hits), func.sum(m.RuleHit.labelled), func.sum(m.RuleHit.fraud))
        .where(m.RuleHit.subject == subject, m.RuleHit.hour >= first_hour, m.RuleHit.hour < end_hour)
        .group_by(m.RuleHit.code)
    )
    for code, hits, labelled, fraud in session.execute(stmt):
        out[code] = [int(hits or 0), int(labelled or 0), int(fraud or 0)]
    return out


def backfill(connection: Connection) -> None:
    """Count every stored event's rule hits and labels into ``rule_hits`` (origin ``backfill``), in SQL."""
    outcome = EVENT_OUTCOME_SQL  # correlated on ``events``: the table is read unaliased below
    if connection.dialect.name == "postgresql":
        sql = f"""
            INSERT INTO rule_hits (subject, hour, code, origin, hits, labelled, fraud)
            SELECT x.subject, x.hour, r.value ->> 'code', 'backfill', COUNT(*), COUNT(x.outcome),
                   COALESCE(SUM(x.outcome), 0)
            FROM (SELECT events.subject, FLOOR(EXTRACT(EPOCH FROM events.occurred_at) / 3600)::bigint AS hour,
                         events.response, {outcome} AS outcome FROM events) x,
                 json_array_elements(x.response -> 'reasons') r
            WHERE r.value ->> 'source' = 'rule'
            GROUP BY x.subject, x.hour, r.value ->> 'code'
        """
    else:
        sql = f"""
            INSERT INTO rule_hits (subject, hour, code, origin, hits, labelled, fraud)
            SELECT x.subject, x.hour, json_extract(r.value, '$.code'), 'backfill', COUNT(*), COUNT(x.outcome),
                   COALESCE(SUM(x.outcome), 0)
            FROM (SELECT events.subject, CAST(strftime('%s', events.occurred_at) AS INTEGER) / 3600 AS hour,
                         CAST(events.response AS TEXT) AS response, {outcome} AS outcome FROM events) x,
                 json_each(x.response, '$.reasons') r
            WHERE json_extract(r.value, '$.source') = 'rule'
            GROUP BY x.subject, x.hour, json_extract(r.value, '$.code')
        """
    connection.execute(text(sql))
