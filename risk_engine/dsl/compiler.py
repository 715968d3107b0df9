"""Type-check a policy against its subject's schema and compile it into one Python function.

The checker and the code generator are one typed walk over the syntax tree: every node yields its type and
the Python source that computes it. Source is only generated from checked nodes: field names come from the
schema, literals are emitted with ``repr``, operators from a fixed table; the policy's text itself is never
evaluated. If the walk found any error, nothing is compiled.

Semantics worth knowing (documented in the README):
* A comparison that touches a missing value is false, and so is the rule (``!=`` and ``not in`` included).
* Errors at run time (division by zero, a missing model) make that rule not fire; others still run.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from risk_engine.dsl import ast
from risk_engine.dsl.errors import DslError, DslErrors, did_you_mean
from risk_engine.dsl.parser import parse_expression, parse_policy
from risk_engine.schema import ATTRIBUTES_PREFIX, FieldType, SubjectSchema

MAX_WINDOW_S = 90 * 86400.0
MIN_WINDOW_S = 1.0
AGGREGATE_FUNCS = ("count", "sum", "avg", "distinct")
REASON_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")
DEFAULT_THRESHOLDS = {ast.Decision.CHALLENGE: 40.0, ast.Decision.REVIEW: 60.0, ast.Decision.BLOCK: 85.0}

# Types of the language, as strings: scalars, "pii:<kind>", "set:<elem>", "list:<kind>", and "?" after an error.
NUMBER, STRING, BOOL, DURATION, ERROR = "number", "string", "bool", "duration", "?"
STRING_LIST_KIND = "string"

Record = Mapping[str, Any]
Aggregates = Mapping[str, float | None]
Lists = Mapping[str, AbstractSet[str]]
ModelScores = Mapping[str, float]
Evaluator = Callable[[Record, Aggregates, Lists, ModelScores], list[int]]
FeatureFn = Callable[[Record, Aggregates, Lists, ModelScores], dict[str, float]]


@dataclass(frozen=True)
class AggSpec:
    """A windowed aggregate: ``func(value by key within window)``."""

    func: str
    value: str | None
    key: str
    window_s: float

    @cached_property
    def id(self) -> str:
        """Canonical text, used as the aggregate's name everywhere."""
        value = f"{self.value} " if self.value else ""
        return f"{self.func}({value}by {self.key} within {_fmt_window(self.window_s)})"


def _fmt_window(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


@dataclass(frozen=True)
class Environment:
    """What a subject's policy may refer to: its schema, the declared lists, the detectors."""

    schema: SubjectSchema
    lists: Mapping[str, str] = field(default_factory=dict)  # name -> "string" or a PII kind
    models: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule's effects, with its position in the policy."""

    index: int
    name: str
    code: str
    text: str
    decision: ast.Decision | None
    score_delta: float
    tags: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class CompiledPolicy:
    """A checked, compiled policy, ready to evaluate events of its subject."""

    subject: str
    text: str
    digest: str
    rules: tuple[CompiledRule, ...]
    thresholds: tuple[tuple[ast.Decision, float], ...]  # ascending score
    aggregates: tuple[AggSpec, ...]
    lists: frozenset[str]
    models: frozenset[str]
    python_source: str
    evaluate: Evaluator


@dataclass(frozen=True)
class CompiledFeatures:
    """Named numeric expressions (a detector's inputs), compiled into one function."""

    names: tuple[str, ...]
    aggregates: tuple[AggSpec, ...]
    lists: frozenset[str]
    python_source: str
    compute: FeatureFn
    # numeric features that are an attribute of the same name, unchanged (``V1 = "attributes.V1"``): their values
    # are the record's, so a stored vector need not repeat them (``detectors.vectors``); the others, in order
    attribute_names: tuple[str, ...] = ()
    kept_names: tuple[str, ...] = ()


def _ne(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a != b


def _not_in(a: Any, b: Any) -> bool:
    return a is not None and a not in b


def _contains(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and b in a


def _starts_with(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.startswith(b)


def _ends_with(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.endswith(b)


def _lower(a: str) -> str:
    return a.lower()


def _upper(a: str) -> str:
    return a.upper()


_RUNTIME: dict[str, Any] = {
    "_ne": _ne,
    "_not_in": _not_in,
    "_contains": _contains,
    "_starts_with": _starts_with,
    "_ends_with": _ends_with,
    "_lower": _lower,
    "_upper": _upper,
    "_log1p": math.log1p,
    "_slog1p": lambda x: math.copysign(math.log1p(abs(x)), x),
    "_sqrt": math.sqrt,
    "_floor": math.floor,
    "_abs": abs,
    "_len": len,
    "_min": min,
    "_max": max,
    "_SAFE": (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError, OverflowError),
    "float": float,
    "str": str,
    "__builtins__": {},
}

# name -> (argument types, result type, python helper). "path" means a field path, as written.
_BUILTINS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "lower": ((STRING,), STRING, "_lower"),
    "upper": ((STRING,), STRING, "_upper"),
    "len": ((STRING,), NUMBER, "_len"),
    "abs": ((NUMBER,), NUMBER, "_abs"),
    "log1p": ((NUMBER,), NUMBER, "_log1p"),
    "slog1p": ((NUMBER,), NUMBER, "_slog1p"),  # sign(x) * log1p(|x|): heavy tails on both sides
    "sqrt": ((NUMBER,), NUMBER, "_sqrt"),
    "floor": ((NUMBER,), NUMBER, "_floor"),
    "min": ((NUMBER, NUMBER), NUMBER, "_min"),
    "max": ((NUMBER, NUMBER), NUMBER, "_max"),
    "days": ((DURATION,), NUMBER, "(86400.0).__rtruediv__"),
    "hours": ((DURATION,), NUMBER, "(3600.0).__rtruediv__"),
    "minutes": ((DURATION,), NUMBER, "(60.0).__rtruediv__"),
    "exists": (("path",), BOOL, ""),
    "model": (("name",), NUMBER, ""),
    "list": (("name",), "list", ""),
}


def _field_type(spec_type: FieldType, pii_kind: str | None) -> str:
    if spec_type is FieldType.PII:
        return f"pii:{pii_kind}"
    return spec_type.value


def _describe(t: str) -> str:
    if t.startswith("pii:"):
        return f"personal data ({t[4:]}, stored as a blind index)"
    if t.startswith("set:"):
        return f"a list of {t[4:]}s"
    if t.startswith("list:"):
        return f"a named list of {t[5:]} values"
    return {NUMBER: "a number", STRING: "a string", BOOL: "true/false", DURATION: "a duration"}.get(t, t)


class _Walk:
    """One typed pass: collects errors and emits Python source for checked nodes."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.errors: list[DslError] = []
        self.aggregates: dict[str, AggSpec] = {}
        self.lists: set[str] = set()
        self.models: set[str] = set()
        self.constants: dict[str, Any] = {}

    def error(self, pos: ast.Pos, code: str, message: str, suggestion: str | None = None) -> tuple[str, str]:
        self.errors.append(DslError(pos.line, pos.column, code, message, suggestion))
        return "None", ERROR

    def constant(self, value: Any) -> str:
        name = f"_c{len(self.constants)}"
        self.constants[name] = value
        return name

    # -- expressions -----------------------------------------------------------------------------------
    def expr(self, node: ast.Expr) -> tuple[str, str]:
        method = getattr(self, "_" + type(node).__name__.lower())
        result: tuple[str, str] = method(node)
        return result

    def _number(self, node: ast.Number) -> tuple[str, str]:
        return repr(node.value), NUMBER

    def _durationlit(self, node: ast.DurationLit) -> tuple[str, str]:
        return repr(node.seconds), DURATION

    def _string(self, node: ast.String) -> tuple[str, str]:
        return repr(node.value), STRING

    def _bool(self, node: ast.Bool) -> tuple[str, str]:
        return repr(node.value), BOOL

    def _path(self, node: ast.Path) -> tuple[str, str]:
        spec = self.env.schema.fields.get(node.name)
        if spec is None:
            hint = did_you_mean(node.name, self.env.schema.fields)
            if hint is None and node.name.startswith("attributes."):
                hint = f"declare it under [{self.env.schema.name}.attributes] in subjects.toml"
            return self.error(
                node.pos, "type.unknown_field", f"unknown field '{node.name}' for subject {self.env.schema.name}", hint
            )
        return f"g({node.name!r})", _field_type(spec.type, spec.pii_kind)

    def _setliteral(self, node: ast.SetLiteral) -> tuple[str, str]:
        types = set()
        values = []
        for item in node.items:
            _code, t = self.expr(item)
            types.add(t)
            if isinstance(item, ast.Number | ast.String):
                values.append(item.value)
        if len(types) > 1:
            return self.error(node.pos, "type.mixed_list", "a list literal mixes numbers and strings")
        elem = types.pop() if types else STRING
        return self.constant(frozenset(values)), f"set:{elem}"

    def _aggregate(self, node: ast.Aggregate) -> tuple[str, str]:
        ok = True
        if node.func not in AGGREGATE_FUNCS:
            self.error(
                node.pos,
                "type.unknown_aggregate",
                f"unknown aggregate '{node.func}'",
                did_you_mean(node.func, AGGREGATE_FUNCS),
            )
            ok = False
        _, key_type = self._path(node.key)
        if key_type in (BOOL, ERROR):
            ok = False
            if key_type == BOOL:
                self.error(node.key.pos, "type.aggregate_key", "an aggregate cannot be keyed by a true/false field")
        value_type = None
        if node.value is not None:
            _, value_type = self._path(node.value)
        if node.func == "count" and node.value is not None:
            self.error(
                node.value.pos,
                "type.aggregate_value",
                "count takes no value field",
                f"write count(by {node.key.name} within {node.window.text})",
            )
            ok = False
        elif node.func in ("sum", "avg") and value_type not in (NUMBER, DURATION):
            if node.value is None:
                self.error(
                    node.pos,
                    "type.aggregate_value",
                    f"{node.func} needs a numeric field to add up",
                    f"e.g. {node.func}(amount.value by {node.key.name} within {node.window.text})",
                )
            elif value_type != ERROR:
                self.error(
                    node.value.pos,
                    "type.aggregate_value",
                    f"{node.func} needs a number, but '{node.value.name}' is {_describe(value_type or '')}",
                )
            ok = False
        elif node.func == "distinct" and node.value is None:
            self.error(
                node.pos,
                "type.aggregate_value",
                "distinct needs the field whose values are counted",
                f"e.g. distinct(device.id by {node.key.name} within {node.window.text})",
            )
            ok = False
        if not MIN_WINDOW_S <= node.window.seconds <= MAX_WINDOW_S:
            self.error(
                node.window.pos,
                "type.window",
                f"window {node.window.text} is outside 1s..90d",
                "use a window from 1s to 90d",
            )
            ok = False
        if not ok:
            return "None", ERROR
        spec = AggSpec(node.func, node.value.name if node.value else None, node.key.name, node.window.seconds)
        self.aggregates[spec.id] = spec
        result_type = DURATION if node.func in ("sum", "avg") and value_type == DURATION else NUMBER
        return f"a[{spec.id!r}]", result_type

    def _call(self, node: ast.Call) -> tuple[str, str]:
        sig = _BUILTINS.get(node.func)
        if sig is None:
            return self.error(
                node.pos, "type.unknown_function", f"unknown function '{node.func}'", did_you_mean(node.func, _BUILTINS)
            )
        arg_types, result, helper = sig
        if len(node.args) != len(arg_types):
            return self.error(
                node.pos, "type.arity", f"{node.func}() takes {len(arg_types)} argument(s), got {len(node.args)}"
            )
        if node.func in ("model", "list"):
            arg = node.args[0]
            if not isinstance(arg, ast.String):
                return self.error(
                    arg.pos, "type.name_literal", f'{node.func}() takes a quoted name, e.g. {node.func}("x")'
                )
            return self._named(node, arg)
        if node.func == "exists":
            arg = node.args[0]
            if not isinstance(arg, ast.Path):
                return self.error(arg.pos, "type.exists", "exists() takes a field path")
            code, t = self._path(arg)
            return (f"({code} is not None)", BOOL) if t != ERROR else ("None", ERROR)
        codes = []
        for arg, want in zip(node.args, arg_types, strict=True):
            code, t = self.expr(arg)
            if t != ERROR and t != want:
                self.error(arg.pos, "type.argument", f"{node.func}() needs {_describe(want)}, got {_describe(t)}")
                return "None", ERROR
            codes.append(code)
        return f"{helper}({', '.join(codes)})", result

    def _named(self, node: ast.Call, arg: ast.String) -> tuple[str, str]:
        name = arg.value
        if node.func == "model":
            if name not in self.env.models:
                return self.error(
                    arg.pos,
                    "type.unknown_model",
                    f"unknown detector '{name}'",
                    did_you_mean(name, self.env.models)
                    or (
                        f"detectors: {', '.join(sorted(self.env.models))}"
                        if self.env.models
                        else "no detector is declared for this subject in models/"
                    ),
                )
            self.models.add(name)
            return f"M[{name!r}]", NUMBER
        if name not in self.env.lists:
            return self.error(
                arg.pos,
                "type.unknown_list",
                f"unknown list '{name}'",
                did_you_mean(name, self.env.lists) or "declare it in rules/lists.toml",
            )
        self.lists.add(name)
        return f"L[{name!r}]", f"list:{self.env.lists[name]}"

    def _unary(self, node: ast.Unary) -> tuple[str, str]:
        code, t = self.expr(node.operand)
        if t == ERROR:
            return "None", ERROR
        if node.op == "not":
            if t != BOOL:
                return self.error(node.pos, "type.not_bool", f"'not' needs true/false, got {_describe(t)}")
            return f"(not {code})", BOOL
        if t not in (NUMBER, DURATION):
            return self.error(node.pos, "type.arithmetic", f"'-' needs a number, got {_describe(t)}")
        return f"(-{code})", t

    def _boolop(self, node: ast.BoolOp) -> tuple[str, str]:
        codes = []
        failed = False
        for operand in node.operands:
            code, t = self.expr(operand)
            if t == ERROR:
                failed = True
            elif t != BOOL:
                self.error(
                    operand.pos,
                    "type.not_bool",
                    f"'{node.op}' needs true/false on each side, got {_describe(t)}",
                    "compare it with something, e.g. '> 0'" if t == NUMBER else None,
                )
                failed = True
            codes.append(code)
        if failed:
            return "None", ERROR
        return "(" + f" {node.op} ".join(codes) + ")", BOOL

    def _binary(self, node: ast.Binary) -> tuple[str, str]:
        if node.op in ("in", "not in"):
            return self._membership(node)
        lcode, lt = self.expr(node.left)
        rcode, rt = self.expr(node.right)
        if ERROR in (lt, rt):
            return "None", ERROR
        op = node.op
        if op in ("+", "-", "*", "/"):
            return self._arith(node, lcode, lt, rcode, rt)
        if op in ("contains", "starts_with", "ends_with"):
            if lt != STRING or rt != STRING:
                bad = lt if lt != STRING else rt
                hint = "personal data can only be compared with a list" if bad.startswith("pii:") else None
                return self.error(node.pos, "type.string_test", f"'{op}' needs strings, got {_describe(bad)}", hint)
            return f"_{op}({lcode}, {rcode})", BOOL
        # comparisons
        if lt != rt:
            hint = None
            if {lt, rt} == {NUMBER, DURATION}:
                hint = "write the number with a unit, like 7d or 10m"
            elif lt.startswith("pii:") or rt.startswith("pii:"):
                hint = 'personal data is stored as a blind index: use `in list("...")`'
            elif {lt, rt} == {NUMBER, STRING}:
                hint = "quote both sides or neither"
            return self.error(node.pos, "type.mismatch", f"cannot compare {_describe(lt)} with {_describe(rt)}", hint)
        if op not in ("==", "!=") and lt not in (NUMBER, DURATION):
            return self.error(node.pos, "type.ordering", f"'{op}' needs numbers or durations, got {_describe(lt)}")
        if op == "!=":
            return f"_ne({lcode}, {rcode})", BOOL
        return f"({lcode} {op} {rcode})", BOOL

    def _arith(self, node: ast.Binary, lcode: str, lt: str, rcode: str, rt: str) -> tuple[str, str]:
        op = node.op
        result: str | None = None
        if lt == NUMBER and rt == NUMBER:
            result = NUMBER
        elif lt == DURATION and rt == DURATION and op in "+-":
            result = DURATION
        elif lt == DURATION and rt == DURATION and op == "/":
            result = NUMBER
        elif (lt == DURATION and rt == NUMBER and op in "*/") or (lt == NUMBER and rt == DURATION and op == "*"):
            result = DURATION
        if result is None:
            return self.error(
                node.pos,
                "type.arithmetic",
                f"cannot apply '{op}' to {_describe(lt)} and {_describe(rt)}",
                "arithmetic works on numbers and durations" if STRING in (lt, rt) else None,
            )
        return f"({lcode} {op} {rcode})", result

    def _membership(self, node: ast.Binary) -> tuple[str, str]:
        lcode, lt = self.expr(node.left)
        right = node.right
        if isinstance(right, ast.Call) and right.func != "list":
            return self.error(right.pos, "type.collection", f"'{node.op}' needs a [list] or list(\"name\")")
        rcode, rt = self.expr(right)
        if ERROR in (lt, rt):
            return "None", ERROR
        if rt.startswith("set:"):
            elem = rt[4:]
            if node.right.items and elem != lt:  # type: ignore[attr-defined]
                return self.error(
                    node.pos,
                    "type.mismatch",
                    f"cannot look for {_describe(lt)} in {_describe(rt)}",
                    'personal data is stored as a blind index: use `in list("...")`' if lt.startswith("pii:") else None,
                )
        elif rt.startswith("list:"):
            kind = rt[5:]
            want = STRING if kind in (STRING_LIST_KIND, "ip_range") else f"pii:{kind}"
            if lt != want and not (kind == STRING_LIST_KIND and lt == NUMBER):
                return self.error(node.pos, "type.list_kind", f"cannot look for {_describe(lt)} in {_describe(rt)}")
        if node.op == "in":
            return f"({lcode} in {rcode})", BOOL
        return f"_not_in({lcode}, {rcode})", BOOL


def _build(source: str, name: str, constants: Mapping[str, Any], filename: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {**_RUNTIME, **constants}
    exec(compile(source, filename, "exec"), namespace)  # source generated from checked nodes only
    # taken out of the namespace it closes over: left in, the function and its globals would form a cycle that
    # only the cyclic garbage collector frees, and it freezes long-lived objects (``risk_engine/collector.py``)
    fn: Callable[..., Any] = namespace.pop(name)
    return fn


def compile_policy(text: str, environments: Mapping[str, Environment], source: str = "<policy>") -> CompiledPolicy:
    """Parse, type-check and compile a policy text. Raises :class:`DslErrors` listing every error."""
    policy = parse_policy(text, source)
    env = environments.get(policy.subject)
    if env is None:
        pos = policy.subject_pos
        raise DslErrors(
            [
                DslError(
                    pos.line,
                    pos.column,
                    "type.unknown_subject",
                    f"unknown subject '{policy.subject}'",
                    did_you_mean(policy.subject, environments) or f"subjects: {', '.join(sorted(environments))}",
                )
            ],
            source,
        )
    walk = _Walk(env)
    thresholds = _check_thresholds(policy, walk)
    rules: list[CompiledRule] = []
    body: list[str] = []
    seen: dict[str, int] = {}
    for index, rule in enumerate(policy.rules):
        if rule.name in seen:
            walk.error(
                rule.pos,
                "rule.duplicate",
                f"rule '{rule.name}' is already defined on line {seen[rule.name]}",
                "give each rule a unique name",
            )
        seen.setdefault(rule.name, rule.pos.line)
        code, t = walk.expr(rule.condition)
        if t not in (BOOL, ERROR):
            walk.error(
                rule.condition.pos,
                "type.condition",
                f"a condition must be true/false, got {_describe(t)}",
                "compare it with something, e.g. '> 0'" if t == NUMBER else None,
            )
        rules.append(_check_actions(rule, index, walk))
        body.append(f"    try:\n        if {code}: h({index})\n    except _SAFE:\n        pass")
    if walk.errors:
        raise DslErrors(walk.errors, source)
    python = "def evaluate(r, a, L, M):\n    g = r.get\n    hits = []\n    h = hits.append\n"
    python += "\n".join(body) + "\n    return hits\n"
    evaluate = _build(python, "evaluate", walk.constants, f"<policy {policy.subject}>")
    return CompiledPolicy(
        subject=policy.subject,
        text=text,
        digest=hashlib.sha256(text.encode()).hexdigest(),
        rules=tuple(rules),
        thresholds=thresholds,
        aggregates=tuple(walk.aggregates.values()),
        lists=frozenset(walk.lists),
        models=frozenset(walk.models),
        python_source=python,
        evaluate=evaluate,
    )


def _check_thresholds(policy: ast.Policy, walk: _Walk) -> tuple[tuple[ast.Decision, float], ...]:
    if len(policy.threshold_blocks) > 1:
        walk.error(
            policy.threshold_blocks[1],
            "thresholds.duplicate",
            "more than one thresholds block",
            "keep one thresholds block",
        )
    if not policy.thresholds:
        return tuple(DEFAULT_THRESHOLDS.items())
    found: dict[ast.Decision, ast.Threshold] = {}
    for t in policy.thresholds:
        if t.decision is ast.Decision.ALLOW:
            walk.error(t.pos, "thresholds.allow", "allow needs no threshold: it is what scores below the others get")
        elif t.decision in found:
            walk.error(t.pos, "thresholds.duplicate", f"threshold for {t.decision} given twice")
        elif not 0 < t.at <= 100:
            walk.error(t.pos, "thresholds.range", f"threshold {t.at:g} is outside 0..100")
        else:
            found[t.decision] = t
    ordered = sorted(found.values(), key=lambda t: t.decision.severity)
    for lower, higher in itertools.pairwise(ordered):
        if higher.at <= lower.at:
            walk.error(
                higher.pos,
                "thresholds.order",
                f"{higher.decision} at {higher.at:g} must be above {lower.decision} at {lower.at:g}",
                "stricter decisions need higher scores",
            )
    return tuple((t.decision, t.at) for t in ordered)


def _check_actions(rule: ast.Rule, index: int, walk: _Walk) -> CompiledRule:
    decisions = [a for a in rule.actions if isinstance(a, ast.Decide)]
    scores = [a for a in rule.actions if isinstance(a, ast.ScoreChange)]
    reasons = [a for a in rule.actions if isinstance(a, ast.ReasonAction)]
    if len(decisions) > 1:
        walk.error(
            decisions[1].pos,
            "rule.decisions",
            f"rule '{rule.name}' forces more than one decision",
            "a rule forces at most one decision",
        )
    if len(scores) > 1:
        walk.error(scores[1].pos, "rule.scores", f"rule '{rule.name}' changes the score twice", "add them up")
    if len(reasons) > 1:
        walk.error(reasons[1].pos, "rule.reasons", f"rule '{rule.name}' has more than one reason")
    delta = scores[0].delta if scores else 0.0
    if scores and not -100 <= delta <= 100:
        walk.error(scores[0].pos, "rule.score_range", f"score change {delta:+g} is outside -100..+100")
    code = reasons[0].code if reasons else rule.name.upper()
    if reasons and not REASON_CODE.match(code):
        walk.error(
            reasons[0].pos,
            "rule.reason_code",
            f"reason code '{code}' is not UPPER_SNAKE_CASE",
            f"write {re.sub(r'[^A-Z0-9_]', '_', code.upper())}",
        )
    text = (reasons[0].text if reasons and reasons[0].text else None) or rule.description or rule.name
    return CompiledRule(
        index=index,
        name=rule.name,
        code=code,
        text=text,
        decision=decisions[0].decision if decisions else None,
        score_delta=delta,
        tags=tuple(a.name for a in rule.actions if isinstance(a, ast.Tag)),
        line=rule.pos.line,
    )


def compile_features(
    exprs: Mapping[str, str], env: Environment, source: str = "<features>", text_names: frozenset[str] = frozenset()
) -> CompiledFeatures:
    """Compile named expressions (a detector's features): numeric, or strings for the names in ``text_names`` (a
    text detector's inputs). Raises :class:`DslErrors`."""
    walk = _Walk(env)
    body = []
    errors: list[DslError] = []
    attribute_names: list[str] = []
    for name, text in exprs.items():
        try:
            node = parse_expression(text, f"{source}:{name}")
        except DslErrors as exc:
            errors.extend(
                DslError(e.line, e.column, e.code, f"feature '{name}': {e.message}", e.suggestion) for e in exc.errors
            )
            continue
        before = len(walk.errors)
        code, t = walk.expr(node)
        for i in range(before, len(walk.errors)):
            e = walk.errors[i]
            walk.errors[i] = DslError(e.line, e.column, e.code, f"feature '{name}': {e.message}", e.suggestion)
        if name in text_names:
            if t not in (STRING, ERROR):
                walk.error(node.pos, "type.feature", f"text feature '{name}' must be a string, got {_describe(t)}")
            convert = "str"
        else:
            if t not in (NUMBER, BOOL, DURATION, ERROR):
                walk.error(node.pos, "type.feature", f"feature '{name}' must be numeric, got {_describe(t)}")
            convert = "float"
            if isinstance(node, ast.Path) and node.name == f"{ATTRIBUTES_PREFIX}{name}" and t in (NUMBER, BOOL):
                attribute_names.append(name)
        if convert == "float" and _may_be_non_finite(node):
            # an infinite or NaN value (x / 1e-320, a long product) would stay in a detector's running statistics
            # for good: it is left out, as a failed expression's is (v - v is 0 only for a finite v)
            body.append(
                f"    try:\n        v = {code}\n        if v is not None:\n            v = float(v)\n"
                f"            if v - v == 0: out[{name!r}] = v\n    except _SAFE:\n        pass"
            )
        else:
            body.append(
                f"    try:\n        v = {code}\n        if v is not None: out[{name!r}] = {convert}(v)\n"
                f"    except _SAFE:\n        pass"
            )
    errors.extend(walk.errors)
    if errors:
        raise DslErrors(errors, source)
    head = "def features(r, a, L, M):\n    g = r.get\n    out = {}\n"
    python = head + "\n".join(body) + "\n    return out\n"
    compute = _build(python, "features", walk.constants, source)
    return CompiledFeatures(
        names=tuple(exprs),
        aggregates=tuple(walk.aggregates.values()),
        lists=frozenset(walk.lists),
        python_source=python,
        compute=compute,
        attribute_names=tuple(attribute_names),
        kept_names=tuple(n for n in exprs if n not in attribute_names),
    )


# functions whose result is no larger than their arguments' (or a small count, a score, a membership): over
# finite inputs, finite
_TAME_FUNCTIONS = frozenset(
    {"lower", "upper", "len", "abs", "log1p", "slog1p", "sqrt", "floor", "min", "max", "days", "hours", "minutes"}
    | {"exists", "model", "list"}
)
_TAME_LITERAL = 1e15


def _may_be_non_finite(node: ast.Expr) -> bool:
    """Whether an expression over the contracts' inputs (finite, at most 1e15 across) could come out infinite
    or NaN: it multiplies or divides, holds a huge literal or calls a function not known to be tame. Sums,
    counts and comparisons of such inputs cannot (an expression nests at most ``MAX_DEPTH`` deep)."""
    if isinstance(node, ast.Number):
        return not abs(node.value) <= _TAME_LITERAL
    if isinstance(node, ast.Binary):
        return node.op in ("*", "/") or _may_be_non_finite(node.left) or _may_be_non_finite(node.right)
    if isinstance(node, ast.Unary):
        return _may_be_non_finite(node.operand)
    if isinstance(node, ast.BoolOp):
        return any(_may_be_non_finite(x) for x in node.operands)
    if isinstance(node, ast.SetLiteral):
        return any(_may_be_non_finite(x) for x in node.items)
    if isinstance(node, ast.Call):
        return node.func not in _TAME_FUNCTIONS or any(_may_be_non_finite(x) for x in node.args)
    return False  # field paths, aggregates, strings, booleans, durations


def aggregate_union(*groups: Sequence[AggSpec]) -> tuple[AggSpec, ...]:
    """All distinct aggregates needed by several consumers, in a stable order."""
    seen: dict[str, AggSpec] = {}
    for group in groups:
        for spec in group:
            seen.setdefault(spec.id, spec)
    return tuple(seen.values())
