"""The rules language: errors with line:column and suggestions, and the semantics of what compiles."""

from __future__ import annotations

import ast as pyast
import gc
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk_engine.dsl import Decision, DslErrors, Environment, compile_features, compile_policy, read_policy_file
from risk_engine.dsl.ast import Binary, String
from risk_engine.dsl.parser import parse_expression
from risk_engine.payments import PAYMENT_SCHEMA
from risk_engine.pipeline import ModelScore, decide
from risk_engine.schema import FieldType

ENV = Environment(
    PAYMENT_SCHEMA.with_attributes({"V1": FieldType.NUMBER, "segment": FieldType.STRING}),
    {"blocked_devices": "string", "blocked_emails": "email"},
    frozenset({"payment_anomaly"}),
)
ENVS = {"payment": ENV}


def one_rule(condition: str, then: str = "block") -> str:
    return f"subject payment\nrule r {{\n  when {condition}\n  then {then}\n}}\n"


# (case, policy text, line, column, error code, words the message must contain, words the suggestion must contain)
ERRORS: list[tuple[str, str, int, int, str, str, str | None]] = [
    ("single = instead of ==", one_rule('channel = "app"'), 3, 16, "syntax.character", "'='", "=="),
    ("single-quoted string", one_rule("channel == 'app'"), 3, 19, "syntax.character", '"\'"', "double quotes"),
    ("&& instead of and", one_rule("buyer.verified && true"), 3, 23, "syntax.character", "'&'", "and"),
    ("missing then", "subject payment\nrule r {\n  when true\n  block\n}\n", 4, 3, "syntax.token", "'block'", "then"),
    (
        "escape that is no character",
        one_rule('channel == "ab\\x4"'),
        3,
        22,
        "syntax.escape",
        "2 hex digits",
        "backslash",
    ),
    (
        "missing closing brace",
        "subject payment\nrule r {\n  when true\n  then block\n",
        5,
        1,
        "syntax.eof",
        "end of text",
        "'}'",
    ),
    ("no subject line", "rule r { when true then block }", 1, 1, "syntax.token", "'rule'", "subject payment"),
    ("misspelt decision", one_rule("true", "blok"), 4, 8, "syntax.token", "'blok'", "allow, challenge"),
    (
        "unknown field",
        one_rule("buyer.acount_age < 7d"),
        3,
        8,
        "type.unknown_field",
        "buyer.acount_age",
        "buyer.account_age",
    ),
    (
        "undeclared attribute",
        one_rule("attributes.V99 > 1"),
        3,
        8,
        "type.unknown_field",
        "attributes.V99",
        "attributes.V1",
    ),
    (
        "string compared with number",
        one_rule('amount.value > "100"'),
        3,
        21,
        "type.mismatch",
        "a number with a string",
        "quote both",
    ),
    (
        "duration compared with number",
        one_rule("buyer.account_age < 7"),
        3,
        26,
        "type.mismatch",
        "duration with a number",
        "7d",
    ),
    ("unknown function", one_rule('lowr(channel) == "app"'), 3, 8, "type.unknown_function", "lowr", "lower"),
    # once a RecursionError (and, from 200 deep, Python's "too many nested parentheses"): the 148th 'not'
    ("nested too deep", one_rule("not " * 1000 + "buyer.verified"), 3, 596, "syntax.depth", "150 levels", "rules"),
    (
        "chain of a thousand 'and's",
        one_rule(" and ".join(["buyer.verified"] * 1000)),
        3,
        16215,  # the 853rd term: 'and' nests to the right
        "syntax.depth",
        "150 levels",
        "several rules",
    ),
    ("wrong argument count", one_rule("abs(amount.value, 2) > 1"), 3, 8, "type.arity", "1 argument", None),
    (
        "unknown list",
        one_rule('device.id in list("blocked_device")'),
        3,
        26,
        "type.unknown_list",
        "blocked_device",
        "blocked_devices",
    ),
    (
        "unknown detector",
        one_rule('model("payment_anomly") > 0.9'),
        3,
        14,
        "type.unknown_model",
        "payment_anomly",
        "payment_anomaly",
    ),
    ("condition is not true/false", one_rule("amount.value"), 3, 8, "type.condition", "got a number", "> 0"),
    ("and on a number", one_rule("amount.value and buyer.verified"), 3, 8, "type.not_bool", "'and'", None),
    ("arithmetic on a string", one_rule("channel + 1 > 2"), 3, 16, "type.arithmetic", "a string and a number", None),
    (
        "sum of a string field",
        one_rule("sum(channel by buyer.id within 1d) > 2"),
        3,
        12,
        "type.aggregate_value",
        "'channel' is a string",
        None,
    ),
    ("window too long", one_rule("count(by buyer.id within 91d) > 2"), 3, 33, "type.window", "91d", "90d"),
    (
        "personal data compared with a literal",
        one_rule('buyer.email == "a@b.c"'),
        3,
        20,
        "type.mismatch",
        "personal data",
        "list",
    ),
    (
        "string test on personal data",
        one_rule('buyer.email contains "x"'),
        3,
        20,
        "type.string_test",
        "personal data",
        "list",
    ),
    (
        "wrong list kind",
        one_rule('device.id in list("blocked_emails")'),
        3,
        8,
        "type.list_kind",
        "named list of email",
        None,
    ),
    ("ordering strings", one_rule('channel > "a"'), 3, 16, "type.ordering", "'>'", None),
    (
        "duplicate rule name",
        "subject payment\nrule a { when true then block }\nrule a { when true then review }\n",
        3,
        6,
        "rule.duplicate",
        "line 2",
        "unique",
    ),
    ("two decisions in a rule", one_rule("true", "block, allow"), 4, 15, "rule.decisions", "more than one", None),
    ("score change out of range", one_rule("true", "score +150"), 4, 8, "rule.score_range", "+150", None),
    (
        "reason code not upper snake",
        one_rule("true", "reason card_test"),
        4,
        8,
        "rule.reason_code",
        "card_test",
        "CARD_TEST",
    ),
    (
        "thresholds out of order",
        "subject payment\nthresholds { review at 50 block at 40 }\n",
        2,
        27,
        "thresholds.order",
        "block at 40",
        "higher",
    ),
    ("threshold for allow", "subject payment\nthresholds { allow at 10 }\n", 2, 14, "thresholds.allow", "allow", None),
    ("unknown subject", "subject paymnt\n", 1, 9, "type.unknown_subject", "paymnt", "payment"),
    ("mixed list literal", one_rule('channel in ["app", 1]'), 3, 19, "type.mixed_list", "mixes", None),
]


@pytest.mark.parametrize(
    ("case", "text", "line", "column", "code", "message", "suggestion"), ERRORS, ids=[e[0] for e in ERRORS]
)
def test_error_has_position_message_and_suggestion(
    case: str, text: str, line: int, column: int, code: str, message: str, suggestion: str | None
) -> None:
    with pytest.raises(DslErrors) as caught:
        compile_policy(text, ENVS)
    error = caught.value.errors[0]
    assert (error.line, error.column, error.code) == (line, column, code), str(error)
    assert message in error.message, error.message
    if suggestion is not None:
        assert error.suggestion is not None and suggestion in error.suggestion, error.suggestion
    assert f"{line}:{column}" in str(caught.value)


def test_a_text_parsed_again_gives_the_same_tree_and_its_errors_name_each_source() -> None:
    # parsing is cached per text: the tree is shared, an error is reported against each caller's own source
    assert parse_expression("log1p(amount.major) * 2") is parse_expression("log1p(amount.major) * 2")
    for source in ("payment.toml:a", "account.toml:b"):
        with pytest.raises(DslErrors) as caught:
            parse_expression("log1p(amount.major", source)
        assert caught.value.source == source and source in str(caught.value)
        assert caught.value.errors[0].code.startswith("syntax")


def test_every_error_in_a_policy_is_reported_in_text_order() -> None:
    text = "subject payment\nrule a { when foo > 1 then block }\nrule b { when bar > 1 then block }\n"
    with pytest.raises(DslErrors) as caught:
        compile_policy(text, ENVS)
    assert [(e.line, e.code) for e in caught.value.errors] == [(2, "type.unknown_field"), (3, "type.unknown_field")]


def test_a_policy_file_that_is_not_utf8_is_an_error_at_its_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.rules"
    path.write_bytes(one_rule('channel == "caf\u00e9"').encode("latin-1"))  # é is one byte, 0xe9, in Latin-1
    with pytest.raises(DslErrors) as caught:
        read_policy_file(path)
    error = caught.value.errors[0]
    assert (error.line, error.column, error.code) == (3, 23, "text.encoding")  # `  when channel == "caf` is 22
    assert "0xe9" in error.message and error.suggestion == "save the file as UTF-8"
    assert str(path) in str(caught.value)
    path.write_text(one_rule('channel == "caf\u00e9"'), encoding="utf-8")
    assert read_policy_file(path) == one_rule('channel == "caf\u00e9"')


def test_a_leading_byte_order_mark_is_not_part_of_the_policy() -> None:
    policy = compile_policy("\ufeff" + one_rule('channel == "app"'), ENVS)
    assert [r.name for r in policy.rules] == ["r"]
    with pytest.raises(DslErrors) as caught:  # positions are as an editor shows them, the mark unseen
        compile_policy("\ufeffsubject payment\nrule r {\n  when foo > 1\n  then block\n}\n", ENVS)
    assert (caught.value.errors[0].line, caught.value.errors[0].column) == (3, 8)


def evaluate(
    text: str,
    record: dict[str, Any],
    aggregates: dict[str, Any] | None = None,
    lists: dict[str, frozenset[str]] | None = None,
    models: dict[str, float] | None = None,
) -> list[str]:
    policy = compile_policy(text, ENVS)
    hits = policy.evaluate(record, aggregates or {}, lists or {}, models or {})
    return [policy.rules[i].name for i in hits]


def test_arithmetic_precedence_and_durations() -> None:
    text = one_rule("amount.value + 2 * 3 == 13 and buyer.account_age >= 1d + 12h")
    assert evaluate(text, {"amount.value": 7, "buyer.account_age": 36 * 3600}) == ["r"]
    assert evaluate(text, {"amount.value": 7, "buyer.account_age": 35 * 3600}) == []
    assert evaluate(one_rule("days(buyer.account_age) > 1.4"), {"buyer.account_age": 1.5 * 86400}) == ["r"]


def test_missing_values_never_fire_a_comparison() -> None:
    assert evaluate(one_rule("buyer.account_age < 1d"), {}) == []
    assert evaluate(one_rule("billing_country != shipping.country"), {"billing_country": "CN"}) == []
    assert evaluate(
        one_rule("billing_country != shipping.country"), {"billing_country": "CN", "shipping.country": "US"}
    ) == ["r"]
    assert evaluate(one_rule('channel not in ["app"]'), {}) == []
    assert evaluate(one_rule("exists(buyer.email)"), {"buyer.email": "bi:email:x"}) == ["r"]
    assert evaluate(one_rule("not exists(buyer.email)"), {}) == ["r"]


def test_runtime_errors_stop_only_their_rule() -> None:
    text = (
        "subject payment\nrule div { when amount.value / item_count > 1 then block }\n"
        "rule ok { when true then review }\n"
    )
    assert evaluate(text, {"amount.value": 5, "item_count": 0}) == ["ok"]


def test_string_tests_sets_and_lists() -> None:
    text = one_rule('lower(device.user_agent) contains "curl" and channel in ["api", "web"]')
    assert evaluate(text, {"device.user_agent": "CURL/8.0", "channel": "api"}) == ["r"]
    assert evaluate(text, {"device.user_agent": "Mozilla", "channel": "api"}) == []
    listed = one_rule('device.id in list("blocked_devices")')
    assert evaluate(listed, {"device.id": "d1"}, lists={"blocked_devices": frozenset({"d1"})}) == ["r"]
    assert evaluate(listed, {"device.id": "d2"}, lists={"blocked_devices": frozenset({"d1"})}) == []


def test_user_text_is_data_never_code() -> None:
    text = one_rule("channel == \"__import__('os').system('false')\"")
    policy = compile_policy(text, ENVS)
    assert "__import__('os')" in policy.python_source  # only inside a string literal
    assert evaluate(text, {"channel": "__import__('os').system('false')"}) == ["r"]
    assert evaluate(text, {"channel": "app"}) == []


def test_aggregates_and_models_are_read_by_name() -> None:
    text = one_rule('count(by payment_method.card_fingerprint within 10m) >= 3 and model("payment_anomaly") > 0.9')
    policy = compile_policy(text, ENVS)
    (spec,) = policy.aggregates
    assert spec.id == "count(by payment_method.card_fingerprint within 10m)"
    assert evaluate(text, {}, {spec.id: 3}, models={"payment_anomaly": 0.95}) == ["r"]
    assert evaluate(text, {}, {spec.id: 2}, models={"payment_anomaly": 0.95}) == []


def test_features_compile_to_numbers() -> None:
    features = compile_features({"amt": "log1p(amount.major)", "new": "buyer.verified", "v": "attributes.V1"}, ENV)
    out = features.compute({"amount.major": 0.0, "buyer.verified": True}, {}, {}, {})
    assert out == {"amt": 0.0, "new": 1.0}
    with pytest.raises(DslErrors) as caught:
        compile_features({"bad": "channel"}, ENV)
    assert "must be numeric" in str(caught.value)


def test_an_infinite_or_nan_feature_is_left_out_as_a_failed_one_is() -> None:
    exprs = {
        "ratio": "amount.major / attributes.V1",  # over a subnormal: infinite, and no ZeroDivisionError
        "nan": "amount.major * amount.major - amount.major * amount.major",  # inf - inf
        "v": "attributes.V1",
    }
    tiny = {"amount.major": 1e200, "attributes.V1": 1e-320}
    usual = {"amount.major": 100.0, "attributes.V1": 4.0}
    features = compile_features(exprs, ENV)
    assert features.compute(tiny, {}, {}, {}) == {"v": 1e-320}
    assert features.compute(usual, {}, {}, {}) == {"ratio": 25.0, "nan": 0.0, "v": 4.0}
    with_text = compile_features({**exprs, "t": "channel"}, ENV, text_names=frozenset({"t"}))
    assert with_text.compute({**tiny, "channel": "app"}, {}, {}, {}) == {"v": 1e-320, "t": "app"}
    # over the contracts' finite, bounded inputs a sum or a log cannot overflow: no check on the hot path
    tame = compile_features({"s": "log1p(amount.major) + attributes.V1 - 3", "r": "attributes.V1 / 2"}, ENV)
    assert tame.python_source.count("v - v == 0") == 1


POLICY = """subject payment
thresholds { challenge at 30 review at 60 block at 85 }
rule plus40 { when attributes.V1 > 0 then score +40 }
rule plus30 { when attributes.V1 > 1 then score +30 }
rule minus20 { when buyer.verified then score -20 }
rule force_block { when channel == "pos" then block }
rule force_allow { when channel == "api" then allow }
rule force_review { when channel == "web" then review }
"""


def verdict(record: dict[str, Any], contribution: float = 0.0) -> tuple[Decision, int]:
    policy = compile_policy(POLICY, ENVS)
    hits = policy.evaluate(record, {}, {}, {})
    models = [ModelScore("payment_anomaly", "1", 0.0, 0.99, contribution)]
    v = decide(policy, hits, models)
    return v.decision, v.score


def test_scores_add_up_clamp_and_map_to_thresholds() -> None:
    assert verdict({"attributes.V1": 0.5}) == (Decision.CHALLENGE, 40)
    assert verdict({"attributes.V1": 2}) == (Decision.REVIEW, 70)
    assert verdict({"attributes.V1": 2}, contribution=20) == (Decision.BLOCK, 90)
    assert verdict({"attributes.V1": 2, "buyer.verified": True}) == (Decision.CHALLENGE, 50)
    assert verdict({"buyer.verified": True}) == (Decision.ALLOW, 0)  # clamped at 0
    assert verdict({"attributes.V1": 2}, contribution=80) == (Decision.BLOCK, 100)  # clamped at 100


def test_forced_decision_precedence() -> None:
    # block beats everything; allow beats the score and forced review; review beats a lower score decision
    assert verdict({"channel": "pos"})[0] is Decision.BLOCK
    assert verdict({"channel": "api", "attributes.V1": 2}, contribution=20)[0] is Decision.ALLOW
    assert verdict({"channel": "web"})[0] is Decision.REVIEW
    assert verdict({"channel": "web", "attributes.V1": 2}, contribution=20)[0] is Decision.BLOCK


STRING_PIECES = [
    *("a", "Z", "7", " ", "{", "}", "x", "N", "'", "\u00e9", "\u676d"),  # plain characters, accented and Chinese too
    *(r"\"", r"\\", r"\n", r"\t", r"\a", r"\v", r"\0", r"\7", r"\101", r"\1234", r"\8", r"\d", "\\\u00e9"),
    *(
        r"\x41",
        r"\x4",
        r"\u00e9",
        r"\u12",
        r"\U0001F600",
        r"\U00110000",
        r"\N{LATIN SMALL LETTER A}",
        r"\N{NOPE}",
        r"\N",
    ),
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(STRING_PIECES), max_size=10))
def test_string_literals_read_as_python_reads_them(pieces: list[str]) -> None:
    # the language's strings are Python's: each escape means what Python makes of it, and one that stands for no
    # character is an error at its place
    token = '"' + "".join(pieces) + '"'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Python warns of unknown escapes (\d), which it keeps as written
        try:
            want: str | None = pyast.literal_eval(token)
        except SyntaxError:
            want = None
    text = f"channel == {token}"
    try:
        got = parse_expression(text)
    except DslErrors as exc:
        (error,) = exc.errors
        assert want is None and error.code == "syntax.escape", (token, error)
        assert text[error.column - 1] == "\\"  # at the escape's backslash
    else:
        assert isinstance(got, Binary) and isinstance(got.right, String)
        assert got.right.value == want, token


def test_policies_parse_in_many_threads_while_the_collector_runs_python() -> None:
    # Python 3.11 counts the depth of the syntax trees ``ast`` builds in one counter for every thread: read through
    # ``ast.literal_eval``, a string in a policy failed when a collection's callback (the engine's collector tuning
    # has one) let another thread parse meanwhile: "AST constructor recursion depth mismatch"
    def let_others_in(phase: str, info: dict[str, int]) -> None:
        time.sleep(0)

    before = sys.getswitchinterval()
    thresholds = gc.get_threshold()
    failures: list[BaseException] = []

    def parse(worker: int) -> None:
        for i in range(1_500):
            try:
                parse_expression(f'channel == "w{worker}_{i}" or device.user_agent contains "curl/{i}"')
            except BaseException as exc:  # every failure is the finding
                failures.append(exc)

    gc.callbacks.append(let_others_in)
    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 1, 1)
    try:
        threads = [threading.Thread(target=parse, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gc.callbacks.remove(let_others_in)
        sys.setswitchinterval(before)
        gc.set_threshold(*thresholds)
    assert failures == []
