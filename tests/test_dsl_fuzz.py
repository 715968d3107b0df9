"""What an analyst's half-finished edit gets from the checker: whatever the text, either a compiled policy or
``DslErrors``, each error at a line:column inside the text, with a message. Never another exception (which the
API would answer with a 500 and the CLI with a traceback), and never a policy compiled from text that does not
say what it runs.

The texts are the shipped policies with random edits: characters, words or whole lines deleted, duplicated,
swapped or replaced by the language's own tokens, so the edits reach deep into the grammar and the checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from risk_engine.config import Settings
from risk_engine.dsl import CompiledPolicy, Decision, DslErrors, compile_policy
from risk_engine.engine import load_environments
from risk_engine.pipeline import decision_for
from risk_engine.schema import FieldType
from tests.conftest import REPO

ENVS, _, _ = load_environments(
    Settings(home=Path("/nonexistent"), rules_dir=REPO / "rules", models_dir=REPO / "models"), check_estimators=False
)
POLICIES = {path.name: path.read_text() for path in sorted((REPO / "rules").glob("*.rules"))}

# pieces of the language an edit may drop in: keywords, operators, literals of each type, built-ins, fields
TOKENS = [
    "rule",
    "when",
    "then",
    "and",
    "or",
    "not",
    "in",
    "subject",
    "payment",
    "review",
    "account",
    "block",
    "allow",
    "review",
    "challenge",
    "score",
    "reason",
    "tag",
    "threshold",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ".",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "=",
    "&&",
    "'",
    '"',
    '"x"',
    "0",
    "1.5",
    "-3",
    "10m",
    "7d",
    "90d",
    "0s",
    "1e309",
    "true",
    "false",
    "null",
    "count",
    "sum",
    "avg",
    "distinct",
    "by",
    "within",
    "list",
    "model",
    "contains",
    "starts_with",
    "lower",
    "log1p",
    "amount.major",
    "buyer.account_age",
    "buyer.email",
    "attributes.V1",
    "shipping.country",
    "seller.credit",
    "\n",
    "#",
    "\\",
    "\t",
    "\u00e9",
    "\x00",
]


@st.composite
def edited_policy(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(sorted(POLICIES.values())))
    for _ in range(draw(st.integers(1, 4))):
        unit = draw(st.sampled_from(["char", "word", "line"]))
        parts = list(text) if unit == "char" else text.split(" ") if unit == "word" else text.split("\n")
        sep = "" if unit == "char" else " " if unit == "word" else "\n"
        if not parts:
            break
        at = draw(st.integers(0, len(parts) - 1))
        edit = draw(st.sampled_from(["delete", "duplicate", "swap", "insert"]))
        if edit == "delete":
            del parts[at]
        elif edit == "duplicate":
            parts.insert(at, parts[at])
        elif edit == "swap":
            other = draw(st.integers(0, len(parts) - 1))
            parts[at], parts[other] = parts[other], parts[at]
        else:
            parts.insert(at, draw(st.sampled_from(TOKENS)))
        text = sep.join(parts)
    return text


def assert_checked(text: str) -> CompiledPolicy | None:
    """Compiled, or refused with errors that each point inside the text; the policy if it compiled."""
    lines = text.split("\n")
    try:
        policy = compile_policy(text, ENVS, "edited.rules")
    except DslErrors as exc:
        assert exc.errors, "refused without an error"
        for error in exc.errors:
            assert 1 <= error.line <= len(lines) + 1, (error, len(lines))
            assert error.column >= 1, error
            if error.line <= len(lines):
                assert error.column <= len(lines[error.line - 1]) + 1, (error, lines[error.line - 1])
            assert error.message.strip(), error
            assert f"{error.line}:{error.column}" in str(exc)
        return None
    assert policy.subject in ENVS
    return policy


# what the contracts let into a record: finite numbers within their bounds, any text, or nothing at all
NUMBERS = st.one_of(
    st.integers(-(10**15), 10**15), st.floats(-1e15, 1e15, allow_nan=False), st.sampled_from([0, 0.0, -0.0, 1e-320])
)
VALUES = {
    FieldType.NUMBER: NUMBERS,
    FieldType.DURATION: st.floats(0, 1e10, allow_nan=False),
    FieldType.STRING: st.text(max_size=12),
    FieldType.PII: st.text(max_size=12),
    FieldType.BOOL: st.booleans(),
}


@st.composite
def policy_and_inputs(draw: st.DrawFn) -> tuple[CompiledPolicy, dict[str, Any], dict[str, Any], dict[str, Any]]:
    policy = None
    while policy is None:
        policy = assert_checked(draw(edited_policy()))
    env = ENVS[policy.subject]
    record = {
        path: draw(st.none() | VALUES[spec.type]) for path, spec in env.schema.fields.items() if draw(st.booleans())
    }
    aggregates = {a.id: draw(st.none() | NUMBERS) for a in policy.aggregates}
    models = {name: draw(st.floats(0, 1)) for name in env.models}
    return policy, record, aggregates, models


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(policy_and_inputs(), st.data())
def test_a_policy_that_compiles_decides_every_record_its_contract_lets_in(
    inputs: tuple[CompiledPolicy, dict[str, Any], dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    # a rule that cannot be evaluated on a record (a missing field, a division by zero) does not fire; the
    # others decide, and the score stays within 0-100 whatever the rules add up to
    policy, record, aggregates, models = inputs
    lists = {
        name: frozenset(data.draw(st.lists(st.text(max_size=12), max_size=3))) for name in ENVS[policy.subject].lists
    }
    hits = policy.evaluate(record, aggregates, lists, models)
    assert all(isinstance(i, int) and 0 <= i < len(policy.rules) for i in hits)
    assert len(set(hits)) == len(hits)
    decision, score = decision_for(policy, hits, data.draw(st.floats(0, 100)))
    assert decision in set(Decision) and 0 <= score <= 100


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited_policy())
def test_an_edited_policy_compiles_or_is_refused_with_positioned_errors(text: str) -> None:
    assert_checked(text)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_shipped_policy_cut_short_anywhere_is_checked(name: str) -> None:
    # an editor's save in the middle of typing: the text up to each line, then to each token of a rule's lines
    text = POLICIES[name]
    cuts = {i for i, c in enumerate(text) if c in "\n {}()"}
    for cut in sorted(cuts)[:: max(1, len(cuts) // 400)]:
        assert_checked(text[:cut])
