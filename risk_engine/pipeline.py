"""The decision pipeline's pure core: rule hits and model scores in, decision, score and reasons out.

How a decision is made (also in the README):

1. **Score.** Start at 0; add every fired rule's ``score`` change and the model part (the detectors'
   combined score above the subject's floor, up to its weight: ``detectors/combine.py``); round and clamp
   to 0-100.
2. **Forced decisions.** A fired rule's ``block`` wins over everything. Otherwise a fired ``allow`` (a
   trusted-buyer or allow-list rule) wins over the score and over forced ``review``/``challenge``.
   Otherwise the decision is the stricter of the forced ones and the score's threshold decision.
3. **Thresholds.** The score maps to the strictest decision whose threshold it reaches; below all, allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from risk_engine.dsl import CompiledPolicy, CompiledRule, Decision


@dataclass(slots=True)  # not frozen: built for every event, and frozen ones cost five times as much to build
class Reason:
    """Why a score or decision came out as it did."""

    code: str
    text: str
    source: Literal["rule", "model"]
    score_delta: float
    decision: Decision | None = None


@dataclass(slots=True)  # not frozen: built for every event, and frozen ones cost five times as much to build
class ModelScore:
    """One detector's output for an event."""

    name: str
    version: str
    raw: float
    score: float  # calibrated 0-1
    contribution: float  # points of the 0-100 score (its share of the model part, see detectors/combine.py)
    explanation: str | None = None
    warming_up: bool = False
    top_features: tuple[tuple[str, float], ...] = ()  # (feature, effect), largest first
    failed: bool = False  # the detector raised on this event: it adds nothing (counted and logged by the engine)


@dataclass(slots=True)  # not frozen: built for every event, and frozen ones cost five times as much to build
class Verdict:
    """The pipeline's answer for one event."""

    decision: Decision
    score: int
    reasons: tuple[Reason, ...]
    fired: tuple[CompiledRule, ...]
    tags: tuple[str, ...]


def threshold_decision(score: float, thresholds: Sequence[tuple[Decision, float]]) -> Decision:
    """Strictest decision whose threshold the score reaches."""
    result = Decision.ALLOW
    for decision, at in thresholds:
        if score >= at and decision.severity > result.severity:
            result = decision
    return result


def decision_for(policy: CompiledPolicy, hits: Sequence[int], model_points: float) -> tuple[Decision, int]:
    """Decision and 0-100 score for fired rules plus detector points (the rules in the module docstring)."""
    rules = policy.rules
    total = model_points
    forced_block = forced_allow = False
    forced = Decision.ALLOW
    for i in hits:
        rule = rules[i]
        total += rule.score_delta
        d = rule.decision
        if d is Decision.BLOCK:
            forced_block = True
        elif d is Decision.ALLOW:
            forced_allow = True
        elif d is not None and d.severity > forced.severity:
            forced = d
    score = max(0, min(100, round(total)))
    if forced_block:
        return Decision.BLOCK, score
    if forced_allow:
        return Decision.ALLOW, score
    decision = threshold_decision(score, policy.thresholds)
    return (forced if forced.severity > decision.severity else decision), score


@cache
def _model_texts(name: str) -> tuple[str, str, str]:
    """A detector's reason code, its warming-up text and its failed text (built once per detector name)."""
    return (
        f"MODEL_{name.upper()}",
        f"{name} is warming up (too few events or labels, or not fitted yet); it adds nothing yet",
        f"{name} could not score this event; it adds nothing to it",
    )


def decide(policy: CompiledPolicy, hits: Sequence[int], models: Sequence[ModelScore]) -> Verdict:
    """Combine fired rules and detector scores into a verdict with its reasons (see the module docstring)."""
    fired = tuple(policy.rules[i] for i in hits)
    decision, score = decision_for(policy, hits, sum(m.contribution for m in models))
    reasons = [Reason(r.code, r.text, "rule", r.score_delta, r.decision) for r in fired]
    reasons.sort(key=lambda r: (r.decision is None, -abs(r.score_delta)))
    for m in models:
        code, warming_text, failed_text = _model_texts(m.name)
        text = failed_text if m.failed else warming_text if m.warming_up else f"{m.name} score {m.score:.3f}"
        if m.explanation:
            text += f": {m.explanation}"
        reasons.append(Reason(code, text, "model", round(m.contribution, 2)))
    tags = tuple(dict.fromkeys(t for r in fired for t in r.tags))
    return Verdict(decision, score, tuple(reasons), fired, tags)
