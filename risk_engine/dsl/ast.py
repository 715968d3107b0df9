"""The rules language's syntax tree. Every node knows where it came from (line, column)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Pos:
    """1-based line and column in the policy text."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


class Decision(StrEnum):
    """Outcomes, least to most severe."""

    ALLOW = "allow"
    CHALLENGE = "challenge"
    REVIEW = "review"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        """Order used to pick the stricter of two decisions."""
        return _SEVERITY[self]


_SEVERITY = {Decision.ALLOW: 0, Decision.CHALLENGE: 1, Decision.REVIEW: 2, Decision.BLOCK: 3}


@dataclass(frozen=True, slots=True)
class Expr:
    """Base of expressions."""

    pos: Pos


@dataclass(frozen=True, slots=True)
class Number(Expr):
    value: float | int


@dataclass(frozen=True, slots=True)
class DurationLit(Expr):
    seconds: float
    text: str


@dataclass(frozen=True, slots=True)
class String(Expr):
    value: str


@dataclass(frozen=True, slots=True)
class Bool(Expr):
    value: bool


@dataclass(frozen=True, slots=True)
class Path(Expr):
    name: str


@dataclass(frozen=True, slots=True)
class SetLiteral(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Aggregate(Expr):
    func: str
    value: Path | None
    key: Path
    window: DurationLit


@dataclass(frozen=True, slots=True)
class Unary(Expr):
    op: str  # "not" | "-"
    operand: Expr


@dataclass(frozen=True, slots=True)
class Binary(Expr):
    op: str  # arithmetic, comparison, string test, "in", "not in"
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class BoolOp(Expr):
    op: str  # "and" | "or"
    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Action:
    pos: Pos


@dataclass(frozen=True, slots=True)
class Decide(Action):
    decision: Decision


@dataclass(frozen=True, slots=True)
class ScoreChange(Action):
    delta: float


@dataclass(frozen=True, slots=True)
class ReasonAction(Action):
    code: str
    text: str | None


@dataclass(frozen=True, slots=True)
class Tag(Action):
    name: str


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    pos: Pos
    description: str | None
    condition: Expr
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class Threshold:
    decision: Decision
    at: float
    pos: Pos


@dataclass(frozen=True)
class Policy:
    subject: str
    subject_pos: Pos
    thresholds: tuple[Threshold, ...]
    rules: tuple[Rule, ...]
    threshold_blocks: tuple[Pos, ...] = field(default_factory=tuple)
