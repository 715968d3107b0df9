"""A shadow version's decisions counted as events are stored, so its report reads counts, not every event.

``shadow_tallies`` holds, per (shadow version, live decision, shadow decision, worker), how many stored events
the two decided so, how many of those have a label, and how many were labelled fraud; ``shadow_rule_hits``,
per (shadow version, rule, worker), how many the shadow's rule fired on. As for ``rule_hits``:

- the group-commit writer adds a batch's counts in the transaction that stores its events (``add``), so a
  count is never ahead of or behind what is stored;
- the label columns move when a label changes an event's outcome, in the label's transaction
  (``label_changes``, from ``rule_hits.tally_labels``);
- each worker adds to rows of its own (``origin``); a read sums them.

Migration 0015 fills both tables from the stored events once (``backfill``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, text
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.counts import add_counts
from risk_engine.storage.labels import EVENT_OUTCOME_SQL


@dataclass(frozen=True, slots=True)
class ShadowOutcome:
    """What a shadow version decided on one event, beside the live decision."""

    version: str  # the shadow's label, e.g. payment:v2
    live: str
    shadow: str
    rules: tuple[str, ...]  # the shadow's rules that fired, by name

    @classmethod
    def of(cls, live: str, recorded: Mapping[str, Any] | None) -> ShadowOutcome | None:
        """From an event's live decision and its stored ``shadow`` column (None: not shadowed)."""
        if not recorded or not isinstance(recorded.get("version"), str):
            return None
        return cls(recorded["version"], live, str(recorded["decision"]), tuple(recorded.get("rules", ())))


@dataclass
class ShadowCounts:
    """A shadow version's counts, summed over the workers."""

    # (live, shadow) -> [events, labelled, fraud]
    decisions: dict[tuple[str, str], list[int]]
    rule_hits: dict[str, int]


def add(cursor: Any, marker: str, origin: str, outcomes: Iterable[ShadowOutcome]) -> None:
    """In the writer's batch transaction: count each of ``outcomes`` (events stored in it, none labelled yet)."""
    decided: Counter[tuple[str, str, str]] = Counter()
    fired: Counter[tuple[str, str]] = Counter()
    for o in outcomes:
        decided[o.version, o.live, o.shadow] += 1
        for rule in o.rules:
            fired[o.version, rule] += 1
    if decided:  # one order: no two batches lock crosswise
        group = "(" + ", ".join([marker] * 5) + ", 0, 0)"
        params: list[Any] = []
        for (version, live, shadow), n in sorted(decided.items()):
            params += (version, live, shadow, origin, n)
        cursor.execute(
            "INSERT INTO shadow_tallies (version, live, shadow, origin, events, labelled, fraud) VALUES "
            + ", ".join(group for _ in decided)
            + " ON CONFLICT (version, live, shadow, origin) DO UPDATE SET events = shadow_tallies.events"
            " + excluded.events",
            tuple(params),
        )
    if fired:
        group = "(" + ", ".join([marker] * 4) + ")"
        params = []
        for (version, rule), n in sorted(fired.items()):
            params += (version, rule, origin, n)
        cursor.execute(
            "INSERT INTO shadow_rule_hits (version, rule, origin, hits) VALUES "
            + ", ".join(group for _ in fired)
            + " ON CONFLICT (version, rule, origin) DO UPDATE SET hits = shadow_rule_hits.hits + excluded.hits",
            tuple(params),
        )


def label_changes(session: Session, changes: Mapping[tuple[str, str, str], tuple[int, int]], origin: str) -> None:
    """Add ``(labelled, fraud)`` to the counts of each (version, live, shadow), in the labels' transaction."""
    rows = [
        {
            "version": version,
            "live": live,
            "shadow": shadow,
            "origin": origin,
            "events": 0,
            "labelled": labelled,
            "fraud": fraud,
        }
        for (version, live, shadow), (labelled, fraud) in sorted(changes.items())
        if labelled or fraud
    ]
    add_counts(session, m.ShadowTally, ("version", "live", "shadow", "origin"), ("labelled", "fraud"), rows)


def counts(session: Session, version: str) -> ShadowCounts:
    """The counts of the shadow version ``version`` (a label such as ``payment:v2``)."""
    decisions: dict[tuple[str, str], list[int]] = {}
    t = m.ShadowTally
    stmt = (
        select(t.live, t.shadow, func.sum(t.events), func.sum(t.labelled), func.sum(t.fraud))
        .where(t.version == version)
        .group_by(t.live, t.shadow)
    )
    for live, shadow, events, labelled, fraud in session.execute(stmt):
        decisions[live, shadow] = [int(events or 0), int(labelled or 0), int(fraud or 0)]
    h = m.ShadowRuleHit
    hits_stmt = select(h.rule, func.sum(h.hits)).where(h.version == version).group_by(h.rule)
    rule_hits = {rule: int(n or 0) for rule, n in session.execute(hits_stmt)}
    return ShadowCounts(decisions, rule_hits)


def backfill(connection: Connection) -> None:
    """Count every stored shadowed event into both tables (origin ``backfill``), in SQL."""
    outcome = EVENT_OUTCOME_SQL  # correlated on ``events``: the table is read unaliased below
    if connection.dialect.name == "postgresql":
        version, decision = "events.shadow ->> 'version'", "events.shadow ->> 'decision'"
        rules = "json_array_elements_text(x.shadow -> 'rules') r(value)"
        shadow = "events.shadow"
    else:
        version = "json_extract(events.shadow, '$.version')"
        decision = "json_extract(events.shadow, '$.decision')"
        rules = "json_each(x.shadow, '$.rules') r"
        shadow = "CAST(events.shadow AS TEXT)"
    shadowed = f"events.shadow IS NOT NULL AND {version} IS NOT NULL"
    connection.execute(
        text(f"""
            INSERT INTO shadow_tallies (version, live, shadow, origin, events, labelled, fraud)
            SELECT x.version, x.live, x.shadow, 'backfill', COUNT(*), COUNT(x.outcome), COALESCE(SUM(x.outcome), 0)
            FROM (SELECT {version} AS version, events.decision AS live, {decision} AS shadow,
                         {outcome} AS outcome FROM events WHERE {shadowed}) x
            GROUP BY x.version, x.live, x.shadow
        """)
    )
    connection.execute(
        text(f"""
            INSERT INTO shadow_rule_hits (version, rule, origin, hits)
            SELECT x.version, r.value, 'backfill', COUNT(*)
            FROM (SELECT {version} AS version, {shadow} AS shadow FROM events WHERE {shadowed}) x, {rules}
            GROUP BY x.version, r.value
        """)
    )
