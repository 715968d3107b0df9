"""The analyst's policy workflow: versions per subject (draft, published, archived), diff, publish, roll back.

Every change writes an audit row (who, when, what, before and after). A draft is type-checked when it is
stored and again when it is published (the schema, lists or detectors may have changed since), so a policy
that does not check can never go live. Publishing swaps the policy in this process at once; other workers
pick it up through their poller (``RiskEngine.refresh_policies``).
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from risk_engine.backtest import (
    EXAMPLES_PER_TRANSITION,
    BacktestReport,
    label_name,
    quality_of_counts,
    replay_one,
    run_backtest,
)
from risk_engine.dsl import CompiledPolicy, DslError, DslErrors, compile_policy
from risk_engine.engine import RiskEngine, now_utc
from risk_engine.errors import Conflict, NotFound
from risk_engine.features.velocity import GRACE_S
from risk_engine.jobs import Job
from risk_engine.storage import models as m
from risk_engine.storage import rule_hits, shadow_tallies
from risk_engine.storage.db import hold_rows, retry_on_race
from risk_engine.storage.labels import event_outcome
from risk_engine.storage.labels import outcome as label_outcome

STREAMED_ROWS = 2_000  # rows a report over many stored events holds decoded at once
EXAMPLE_SCAN_EVENTS = 100_000  # the newest stored events a shadow report looks through for its examples


@dataclass
class RuleStat:
    """How often one rule fired, and how its labelled hits turned out."""

    rule: str
    code: str
    hits_1h: int = 0
    hits_1d: int = 0
    hits_window: int = 0
    labelled: int = 0
    labelled_fraud: int = 0

    def count(self, age_s: float, fraud: bool | None) -> None:
        """One hit, ``age_s`` before the latest event, with its label if it has one."""
        self.hits_window += 1
        self.hits_1d += age_s < 86400
        self.hits_1h += age_s < 3600
        if fraud is not None:
            self.labelled += 1
            self.labelled_fraud += fraud


def _view(row: m.PolicyVersion, with_text: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "subject": row.subject,
        "version": row.version,
        "label": f"{row.subject}:v{row.version}",
        "status": row.status,
        "digest": row.digest,
        "source": row.source,
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat(),
    }
    if with_text:
        out["text"] = row.text
    return out


class PolicyWorkflow:
    """Drafts, versions, diffs, publishing and rollback for one engine's database."""

    def __init__(self, engine: RiskEngine) -> None:
        self.engine = engine

    def _session(self) -> Session:
        return Session(self.engine.db, expire_on_commit=False)

    def _subject(self, subject: str) -> None:
        if subject not in self.engine.subjects:
            raise NotFound(f"no subject {subject}; subjects: {', '.join(sorted(self.engine.subjects))}")

    def _row(self, s: Session, subject: str, version: int) -> m.PolicyVersion:
        row = s.scalars(
            select(m.PolicyVersion).where(m.PolicyVersion.subject == subject, m.PolicyVersion.version == version)
        ).first()
        if row is None:
            raise NotFound(f"no version {version} of the {subject} policy")
        return row

    def _check_again(self, subject: str, version: int) -> None:
        """Compile a stored version (its text never changes) against today's schema and lists, before any lock is
        taken: a version that no longer checks cannot go live or into shadow. Raises NotFound or DslErrors."""
        self._subject(subject)
        with self._session() as s:
            text = self._row(s, subject, version).text
        compile_policy(text, self.engine.environments, f"{subject}:v{version}")

    @staticmethod
    def _shadow_row(s: Session, subject: str) -> m.PolicyVersion | None:
        return s.scalars(
            select(m.PolicyVersion).where(m.PolicyVersion.subject == subject, m.PolicyVersion.status == "shadow")
        ).first()

    def versions(self, subject: str) -> list[dict[str, Any]]:
        """Every version of a subject's policy, newest first."""
        self._subject(subject)
        with self._session() as s:
            rows = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.subject == subject)
                .order_by(m.PolicyVersion.version.desc())
            ).all()
        return [_view(r) for r in rows]

    def version(self, subject: str, version: int) -> dict[str, Any]:
        """One version with its text."""
        self._subject(subject)
        with self._session() as s:
            return _view(self._row(s, subject, version), with_text=True)

    def diff(self, subject: str, old: int, new: int) -> str:
        """Unified diff between two versions' texts."""
        a, b = self.version(subject, old), self.version(subject, new)
        lines = difflib.unified_diff(
            a["text"].splitlines(keepends=True), b["text"].splitlines(keepends=True), a["label"], b["label"]
        )
        return "".join(lines)

    def create_draft(self, subject: str, text: str, actor: str) -> tuple[dict[str, Any], bool]:
        """Check and store a draft. The same text again returns the version already stored (not created)."""
        self._subject(subject)
        compiled = compile_policy(text, self.engine.environments, f"{subject}:draft")  # raises DslErrors
        if compiled.subject != subject:
            raise DslErrors(
                [
                    DslError(
                        1,
                        1,
                        "policy.subject",
                        f"the text is for subject {compiled.subject}, not {subject}",
                        f"start it with 'subject {subject}'",
                    )
                ]
            )
        return retry_on_race(lambda: self._store_draft(subject, text, compiled, actor))  # concurrent drafts

    def _store_draft(
        self, subject: str, text: str, compiled: CompiledPolicy, actor: str
    ) -> tuple[dict[str, Any], bool]:
        with self._session() as s:
            # the number first, then the text (as in RiskEngine._seed_policy): one text, one version
            latest = s.scalar(select(func.max(m.PolicyVersion.version)).where(m.PolicyVersion.subject == subject)) or 0
            existing = s.scalars(
                select(m.PolicyVersion).where(
                    m.PolicyVersion.subject == subject, m.PolicyVersion.digest == compiled.digest
                )
            ).first()
            if existing is not None:
                return _view(existing), False
            row = m.PolicyVersion(
                subject=subject,
                version=latest + 1,
                status="draft",
                text=text,
                digest=compiled.digest,
                source="api",
                created_by=actor,
                created_at=now_utc(),
            )
            s.add(row)
            RiskEngine._audit(
                s,
                actor,
                "policy.draft",
                f"{subject}:v{latest + 1}",
                None,
                {"digest": compiled.digest, "rules": len(compiled.rules)},
            )
            s.commit()
            return _view(row), True

    def publish(self, subject: str, version: int, actor: str, rollback: bool = False) -> dict[str, Any]:
        """Make a version live (check it again first); the previous live version is archived. A ``rollback``
        returns only to a version that was live before, and is audited as one."""
        self._check_again(subject, version)
        with self._session() as s:
            hold_rows(s, m.PolicyVersion.status, m.PolicyVersion.subject == subject)  # changes take turns
            row = self._row(s, subject, version)
            if rollback and row.status not in ("archived", "published"):
                raise Conflict(
                    f"{subject}:v{version} was never published ({row.status}): a rollback returns to a version "
                    "that was live before; publish it instead"
                )
            current = s.scalars(
                select(m.PolicyVersion).where(m.PolicyVersion.subject == subject, m.PolicyVersion.status == "published")
            ).first()
            if current is not None and current.version == version:
                return _view(row)
            s.execute(
                update(m.PolicyVersion)
                .where(m.PolicyVersion.subject == subject, m.PolicyVersion.status == "published")
                .values(status="archived")
            )
            row.status = "published"
            RiskEngine._audit(
                s,
                actor,
                "policy.rollback" if rollback else "policy.publish",
                f"{subject}:v{version}",
                {"version": current.version if current else None},
                {"version": version},
            )
            s.commit()
            view = _view(row)
        self.engine.refresh_policies()  # what is live now: a change that committed after this one may have won
        return view

    def start_shadow(self, subject: str, version: int, actor: str) -> dict[str, Any]:
        """Score live events with this version too, recording its decisions only (one shadow per subject)."""
        self._check_again(subject, version)
        with self._session() as s:
            hold_rows(s, m.PolicyVersion.status, m.PolicyVersion.subject == subject)  # changes take turns
            row = self._row(s, subject, version)
            if row.status == "published":
                raise Conflict(f"{subject}:v{version} is the published version; shadow a draft")
            previous = self._shadow_row(s, subject)
            if previous is not None and previous.version == version:
                return _view(row)
            if previous is not None:
                previous.status = "draft"
                s.flush()  # before the new shadow: one shadow a subject, which the database holds to
            row.status = "shadow"
            # every event this version decides in shadow is stored after this one: its report reads from here
            from_event_id = s.scalar(select(func.max(m.Event.id)).where(m.Event.subject == subject)) or 0
            RiskEngine._audit(
                s,
                actor,
                "policy.shadow",
                f"{subject}:v{version}",
                {"shadow": previous.version if previous else None},
                {"shadow": version, "from_event_id": from_event_id},
            )
            s.commit()
            view = _view(row)
        self.engine.refresh_policies()
        return view

    def stop_shadow(self, subject: str, actor: str) -> dict[str, Any]:
        """Stop the shadow; its version becomes a draft again."""
        self._subject(subject)
        with self._session() as s:
            hold_rows(s, m.PolicyVersion.status, m.PolicyVersion.subject == subject)  # changes take turns
            row = self._shadow_row(s, subject)
            if row is None:
                raise NotFound(f"no {subject} policy is in shadow")
            row.status = "draft"
            RiskEngine._audit(
                s, actor, "policy.shadow_stop", f"{subject}:v{row.version}", {"shadow": row.version}, {"shadow": None}
            )
            s.commit()
            view = _view(row)
        self.engine.refresh_policies()
        return view

    def shadow_report(self, subject: str) -> dict[str, Any]:
        """How the shadow version's recorded decisions compare with the live ones, so far.

        The counts come from the tallies kept as events are stored (``storage/shadow_tallies.py``), so the
        report costs the same after a day of shadow as after a minute; only the examples are read from events,
        the newest first, and at most ``EXAMPLE_SCAN_EVENTS`` of them."""
        self._subject(subject)
        with self._session() as s:
            row = self._shadow_row(s, subject)
            if row is None:
                raise NotFound(f"no {subject} policy is in shadow")
            label = f"{subject}:v{row.version}"
            tallied = shadow_tallies.counts(s, label)
            transitions = {
                f"{live}->{shadow}": n[0] for (live, shadow), n in tallied.decisions.items() if live != shadow and n[0]
            }
            examples = self._shadow_examples(
                s, label, [pair for pair, n in tallied.decisions.items() if pair[0] != pair[1] and n[0]]
            )
        counts = tallied.decisions.values()
        events = sum(n[0] for n in counts)
        fraud = sum(n[2] for n in counts)

        def quality(alerting: tuple[str, ...], side: int) -> dict[str, Any]:
            alerts = [n for decided, n in tallied.decisions.items() if decided[side] in alerting]
            flagged, caught = sum(n[0] for n in alerts), sum(n[2] for n in alerts)
            return asdict(quality_of_counts(flagged, caught, fraud, events))

        return {
            "subject": subject,
            "shadow": label,
            "live": self.engine.subjects[subject].policy.label,
            "events": events,
            "agreed": sum(n[0] for (live, shadow), n in tallied.decisions.items() if live == shadow),
            "disagreed": sum(transitions.values()),
            "transitions": _most_first(transitions),
            "examples": {t: examples.get(t, []) for t in _most_first(transitions)},
            "rule_hits": _most_first(tallied.rule_hits),
            "labelled": sum(n[1] for n in counts),
            "fraud": fraud,
            # against the labels so far, as a backtest measures (unlabelled: legitimate)
            "quality": {
                name: {"block": quality(("block",), side), "block_or_review": quality(("block", "review"), side)}
                for side, name in enumerate(("live", "shadow"))
            },
        }

    def _shadow_examples(
        self, s: Session, label: str, transitions: Iterable[tuple[str, str]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Per (live, shadow) decision pair, its newest ``EXAMPLES_PER_TRANSITION`` events (oldest first), from the
        newest ``EXAMPLE_SCAN_EVENTS`` events stored (of any subject), and of those only the ones stored since
        ``label`` first went into shadow: one query a pair, each picked out by the database, newest first."""
        found: dict[str, list[dict[str, Any]]] = {}
        transitions = sorted(transitions)
        if not transitions:
            return found
        newest = s.scalar(select(func.max(m.Event.id))) or 0
        bound = newest - EXAMPLE_SCAN_EVENTS
        since = self._shadowed_after(s, label)
        if since is not None:  # the events stored since it first went into shadow, not the whole history
            bound = max(bound, since)
        for live, shadow in transitions:
            stmt = (
                select(m.Event.event_id, m.Event.score, m.Event.shadow, event_outcome())
                .where(  # no test of the subject, which the version names: an index on it would scan them all
                    m.Event.id > bound,
                    m.Event.decision == live,
                    m.Event.shadow["decision"].as_string() == shadow,
                    m.Event.shadow["version"].as_string() == label,
                )
                .order_by(m.Event.id.desc())
                .limit(EXAMPLES_PER_TRANSITION)
            )
            found[f"{live}->{shadow}"] = [
                {
                    "event_id": event_id,
                    "label": label_name(label_outcome(labelled_as)),
                    "live_score": live_score,
                    "shadow_score": recorded.get("score"),
                    "shadow_rules": recorded.get("rules", []),
                }
                for event_id, live_score, recorded, labelled_as in s.execute(stmt)
            ][::-1]
        return found

    @staticmethod
    def _shadowed_after(s: Session, label: str) -> int | None:
        """The newest event id stored before ``label`` first went into shadow, from the audit log; None if any
        of its shadow runs predates that record (then every event is read)."""
        runs = s.scalars(
            select(m.AuditEntry.after).where(m.AuditEntry.target == label, m.AuditEntry.action == "policy.shadow")
        ).all()
        starts = [run.get("from_event_id") if isinstance(run, dict) else None for run in runs]
        if not starts or any(not isinstance(start, int) for start in starts):
            return None
        return min(start for start in starts if isinstance(start, int))

    def rule_statistics(self, subject: str, window_days: int = 30) -> dict[str, Any]:
        """Per rule of the live policy: hits in the last hour, day and ``window_days`` (counted back from the
        latest stored event), and among its hits that have a label, the share labelled fraud.

        Whole hours come from the hourly counts (``storage/rule_hits.py``); only the hour of the latest event and
        the part-hour at each window's far end are read event by event, so the cost is a few hours' events
        whatever the window."""
        self._subject(subject)
        latest = self.engine.latest_event_time(subject)
        policy = self.engine.subjects[subject].policy
        codes = {r.code: r.name for r in policy.compiled.rules}
        stats = {r.name: RuleStat(r.name, r.code) for r in policy.compiled.rules}
        if latest is not None:
            with self._session() as s:
                self._count_rule_hits(s, subject, latest, window_days * 86400, codes, stats)
        rules = []
        for stat in sorted(stats.values(), key=lambda r: -r.hits_window):
            view = asdict(stat)
            view[f"hits_{window_days}d"] = view.pop("hits_window")
            view["fraud_share"] = round(stat.labelled_fraud / stat.labelled, 4) if stat.labelled else None
            rules.append(view)
        as_of = datetime.fromtimestamp(latest, UTC).isoformat() if latest is not None else None
        return {"subject": subject, "policy": policy.label, "as_of": as_of, "rules": rules}

    @staticmethod
    def _count_rule_hits(
        s: Session, subject: str, latest: float, window_s: float, codes: dict[str, str], stats: dict[str, RuleStat]
    ) -> None:
        """Fill ``stats``: windows of 1 h, 1 d and ``window_s`` ending at ``latest`` (the last one from ``latest -
        window_s`` on, the two others strictly after their start, as ``RuleStat.count`` has it)."""
        now_hour = rule_hits.hour_of(latest)

        def scan(since: float, until: float, each: Callable[[str, float, bool | None], None]) -> None:
            """Each rule hit of the events in ``[since, until)``: ``each(rule name, age, outcome)``."""
            rows = s.execute(
                select(m.Event.occurred_at, m.Event.response, event_outcome())
                .where(
                    m.Event.subject == subject,
                    m.Event.occurred_at >= datetime.fromtimestamp(since, UTC),
                    m.Event.occurred_at < datetime.fromtimestamp(until, UTC),
                )
                .execution_options(yield_per=STREAMED_ROWS)
            )
            for occurred_at, response, labelled_as in rows:
                age = latest - occurred_at.timestamp()
                for code in rule_hits.rule_codes(response):
                    name = codes.get(code)
                    if name is not None:
                        each(name, age, label_outcome(labelled_as))

        # the latest event's hour, read whole: in every window
        scan(now_hour * rule_hits.HOUR_S, latest + 1.0, lambda name, age, outcome: stats[name].count(age, outcome))
        for span, field in ((3600.0, "hits_1h"), (86400.0, "hits_1d"), (window_s, "hits_window")):
            start = latest - span
            strict = field != "hits_window"  # the hour and day leave out an event exactly at their start
            # the first hour wholly inside the window
            first_whole = start // rule_hits.HOUR_S + 1 if strict else -(-start // rule_hits.HOUR_S)
            if first_whole < now_hour:
                for code, (hits, labelled, fraud) in rule_hits.counts(s, subject, int(first_whole), now_hour).items():
                    name = codes.get(code)
                    if name is None:
                        continue
                    setattr(stats[name], field, getattr(stats[name], field) + hits)
                    if field == "hits_window":
                        stats[name].labelled += labelled
                        stats[name].labelled_fraud += fraud
            # the part-hour before the first whole one (or before the latest's hour)
            edge_end = min(first_whole, now_hour) * rule_hits.HOUR_S

            def at_edge(
                name: str,
                age: float,
                outcome: bool | None,
                field: str = field,
                span: float = span,
                strict: bool = strict,
            ) -> None:
                if age > span or (strict and age >= span):
                    return  # before the window's start
                setattr(stats[name], field, getattr(stats[name], field) + 1)
                if field == "hits_window" and outcome is not None:
                    stats[name].labelled += 1
                    stats[name].labelled_fraud += outcome

            if start < edge_end:
                scan(start, edge_end, at_edge)

    def rollback(self, subject: str, to_version: int, actor: str) -> dict[str, Any]:
        """Make an earlier version live again."""
        return self.publish(subject, to_version, actor, rollback=True)

    def backtest(
        self,
        subject: str,
        draft_text: str,
        draft_label: str,
        since_s: float,
        progress: Callable[[int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> BacktestReport:
        """Replay the last ``since_s`` seconds of stored events (up to the latest) through a draft and the
        published version."""
        self._subject(subject)
        envs = self.engine.environments
        draft = compile_policy(draft_text, envs, draft_label)
        live = self.engine.subjects[subject].policy
        latest = self.engine.latest_event_time(subject)
        # stored times start in 1970: a longer look back (99999d) means everything, not a date before year 1
        since_ts = max(latest - since_s, 0.0) if latest is not None else 0.0
        warmup = max((a.window_s for a in (*draft.aggregates, *live.compiled.aggregates)), default=0.0) + GRACE_S
        events = self.engine.backtest_events(subject, since_ts, warmup)
        return run_backtest(
            subject,
            (draft_label, draft),
            (live.label, live.compiled),
            events,
            since_ts,
            self.engine.list_snapshot(),
            progress,
            cancelled,
            self.engine.settings.velocity_max_events_per_key,
        )

    def evaluate_stored(self, subject: str, text: str, label: str, event_id: str) -> dict[str, Any]:
        """What a policy text would have decided on one stored event, beside what live decided."""
        self._subject(subject)
        compiled = compile_policy(text, self.engine.environments, label)
        if compiled.subject != subject:
            raise NotFound(f"{label} is a {compiled.subject} policy")
        event, aggregates, answer = self.engine.stored_event(subject, event_id)
        rebuilt = [a for a in compiled.aggregates if a.id not in aggregates]
        window = max((a.window_s for a in rebuilt), default=0.0) + GRACE_S
        history = self.engine.backtest_events(subject, event.ts, window) if rebuilt else ()
        replayed = replay_one(
            compiled,
            event,
            aggregates,
            self.engine.list_snapshot(),
            history,
            self.engine.settings.velocity_max_events_per_key,
        )
        live_rules = [r["code"] for r in answer.get("reasons", ()) if r.get("source") == "rule"]
        return {
            "subject": subject,
            "event_id": event_id,
            "label": label_name(event.fraud),
            "version": label,
            **replayed,
            "live": {
                "policy_version": event.live_policy,
                "decision": event.live_decision,
                "score": event.live_score,
                "rule_codes": live_rules,
            },
        }

    def evaluate_version(self, subject: str, version: int, event_id: str) -> dict[str, Any]:
        """What a stored version would have decided on one stored event (``evaluate_stored``)."""
        row = self.version(subject, version)
        return self.evaluate_stored(subject, row["text"], row["label"], event_id)

    def backtest_version(self, subject: str, version: int, since_s: float, job: Job) -> dict[str, Any]:
        """A stored version's backtest, as a background job's work."""
        row = self.version(subject, version)

        def progress(n: int) -> None:
            job.processed = n

        return self.backtest(subject, row["text"], row["label"], since_s, progress, job.cancel).as_dict()

    def audit(
        self,
        limit: int = 100,
        before_id: int | None = None,
        action: str | None = None,
        target: str | None = None,
        actor: str | None = None,
    ) -> list[dict[str, Any]]:
        """The audit log, newest first; ``action`` ending in ``.`` matches every action of that family."""
        stmt = select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit)
        if before_id is not None:
            stmt = stmt.where(m.AuditEntry.id < before_id)
        if action is not None:
            stmt = stmt.where(
                m.AuditEntry.action.startswith(action, autoescape=True)
                if action.endswith(".")
                else m.AuditEntry.action == action
            )
        if target is not None:
            stmt = stmt.where(m.AuditEntry.target == target)
        if actor is not None:
            stmt = stmt.where(m.AuditEntry.actor == actor)
        with self._session() as s:
            rows = s.scalars(stmt).all()
        return [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "before": r.before,
                "after": r.after,
            }
            for r in rows
        ]


def _most_first(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` from the largest down, ties by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
