"""Text to syntax tree, with a real grammar (lark, LALR) and friendly syntax errors."""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from pathlib import Path as FsPath
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from risk_engine.dsl import ast
from risk_engine.dsl.errors import DslError, DslErrors

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

_TOKEN_WORDS = {
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "DOT": "'.'",
    "MINUS": "'-'",
    "NAME": "a name",
    "NUMBER": "a number",
    "SIGNED_NUMBER": "a signed number like +20",
    "STRING": 'a "string"',
    "DURATION": "a duration like 10m",
    "DECISION": "a decision (allow, challenge, review, block)",
    "COMP_OP": "a comparison",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*' or '/'",
    "STR_OP": "contains, starts_with or ends_with",
    "AGG_FUNC": "an aggregate (count, sum, distinct, avg)",
    "$END": "end of text",
}


@cache
def _parser() -> Lark:
    grammar = (FsPath(__file__).parent / "grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        start=["start", "expr"],
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _pos(item: Token | Tree[Any]) -> ast.Pos:
    if isinstance(item, Token):
        return ast.Pos(item.line or 1, item.column or 1)
    return ast.Pos(item.meta.line, item.meta.column)


def _duration(tok: Token) -> ast.DurationLit:
    text = str(tok)
    unit = "ms" if text.endswith("ms") else text[-1]
    return ast.DurationLit(_pos(tok), float(text[: -len(unit)]) * _UNITS[unit], text)


_DURATION_TEXT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration written as in the rules language: ``500ms``, ``10m``, ``30d``, ``2w``."""
    match = _DURATION_TEXT.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write e.g. 30d, 12h, 10m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _number(text: str) -> float | int:
    return float(text) if "." in text else int(text)


@v_args(meta=True)
class _ToAst(Transformer[Token, Any]):
    def _p(self, meta: Any) -> ast.Pos:
        return ast.Pos(meta.line, meta.column)

    # -- policy --
    def start(self, meta: Any, items: list[Any]) -> ast.Policy:
        subject_name, subject_pos = items[0]
        rules = tuple(i for i in items[1:] if isinstance(i, ast.Rule))
        blocks = [i for i in items[1:] if isinstance(i, tuple) and i and i[0] == "thresholds"]
        thresholds = tuple(t for b in blocks for t in b[2])
        return ast.Policy(subject_name, subject_pos, thresholds, rules, tuple(b[1] for b in blocks))

    def subject_decl(self, meta: Any, items: list[Token]) -> tuple[str, ast.Pos]:
        return str(items[0]), _pos(items[0])

    def thresholds(self, meta: Any, items: list[ast.Threshold]) -> tuple[str, ast.Pos, list[ast.Threshold]]:
        return ("thresholds", self._p(meta), items)

    def threshold(self, meta: Any, items: list[Token]) -> ast.Threshold:
        return ast.Threshold(ast.Decision(str(items[0])), float(items[1]), _pos(items[0]))

    def rule(self, meta: Any, items: list[Any]) -> ast.Rule:
        name = items[0]
        description, condition, actions = items[1], items[2], items[3]
        return ast.Rule(str(name), _pos(name), description, condition, tuple(actions))

    def description(self, meta: Any, items: list[Token]) -> str:
        return _unquote(items[0])

    def when_clause(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return items[0]

    def then_clause(self, meta: Any, items: list[ast.Action]) -> list[ast.Action]:
        return items

    def decide(self, meta: Any, items: list[Token]) -> ast.Action:
        return ast.Decide(self._p(meta), ast.Decision(str(items[0])))

    def score(self, meta: Any, items: list[Token]) -> ast.Action:
        return ast.ScoreChange(self._p(meta), float(items[0]))

    def reason(self, meta: Any, items: list[Token | None]) -> ast.Action:
        code, text = items
        return ast.ReasonAction(self._p(meta), str(code), _unquote(text) if text is not None else None)

    def tag(self, meta: Any, items: list[Token]) -> ast.Action:
        return ast.Tag(self._p(meta), str(items[0]))

    # -- expressions --
    def or_(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return _flatten_bool(self._p(meta), "or", items)

    def and_(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return _flatten_bool(self._p(meta), "and", items)

    def not_(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return ast.Unary(self._p(meta), "not", items[0])

    def neg(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return ast.Unary(self._p(meta), "-", items[0])

    def compare(self, meta: Any, items: list[Any]) -> ast.Expr:
        left, op, right = items
        return ast.Binary(_pos(op), str(op), left, right)

    def string_test(self, meta: Any, items: list[Any]) -> ast.Expr:
        left, op, right = items
        return ast.Binary(_pos(op), str(op), left, right)

    def arith(self, meta: Any, items: list[Any]) -> ast.Expr:
        left, op, right = items
        return ast.Binary(_pos(op), str(op), left, right)

    def in_(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return ast.Binary(self._p(meta), "in", items[0], items[1])

    def not_in(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return ast.Binary(self._p(meta), "not in", items[0], items[1])

    def number(self, meta: Any, items: list[Token]) -> ast.Expr:
        return ast.Number(_pos(items[0]), _number(str(items[0])))

    def neg_number(self, meta: Any, items: list[Token]) -> ast.Expr:
        return ast.Number(self._p(meta), -_number(str(items[0])))

    def duration(self, meta: Any, items: list[Token]) -> ast.Expr:
        return _duration(items[0])

    def string(self, meta: Any, items: list[Token]) -> ast.Expr:
        return ast.String(_pos(items[0]), _unquote(items[0]))

    def true(self, meta: Any, items: list[Any]) -> ast.Expr:
        return ast.Bool(self._p(meta), True)

    def false(self, meta: Any, items: list[Any]) -> ast.Expr:
        return ast.Bool(self._p(meta), False)

    def set_literal(self, meta: Any, items: list[ast.Expr | None]) -> ast.Expr:
        return ast.SetLiteral(self._p(meta), tuple(i for i in items if i is not None))

    def literal(self, meta: Any, items: list[ast.Expr]) -> ast.Expr:
        return items[0]

    def aggregate(self, meta: Any, items: list[Any]) -> ast.Expr:
        func, value, key, window = items
        return ast.Aggregate(self._p(meta), str(func), value, key, _duration(window))

    def call(self, meta: Any, items: list[Any]) -> ast.Expr:
        name, *args = items
        return ast.Call(_pos(name), str(name), tuple(a for a in args if a is not None))

    def path(self, meta: Any, items: list[Token]) -> ast.Expr:
        return ast.Path(_pos(items[0]), ".".join(str(t) for t in items))


def _flatten_bool(pos: ast.Pos, op: str, items: list[ast.Expr]) -> ast.Expr:
    operands: list[ast.Expr] = []
    for item in items:
        if isinstance(item, ast.BoolOp) and item.op == op:
            operands.extend(item.operands)
        else:
            operands.append(item)
    return ast.BoolOp(operands[0].pos if operands else pos, op, tuple(operands))


# a string literal's escapes, as Python writes them: one character, or a code point in hex, octal or by name
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}|[0-7]{1,3}|.)")
_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}


_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


class BadEscape(ValueError):
    """An escape in a string literal that stands for no character (``\\x4``, ``\\N{no such name}``)."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line, self.column = line, column


def _unquote(tok: Token | str) -> str:
    """A STRING token's text, its escapes read as Python reads them (an unknown one, ``\\d``, kept as written).

    Not through ``ast.literal_eval``: Python 3.11 counts the depth of the syntax trees it builds in one counter
    for every thread, and a collection whose callback let another thread parse meanwhile failed a policy with
    "AST constructor recursion depth mismatch" (the engine's collector tuning has such a callback)."""
    text = str(tok)[1:-1]
    if "\\" not in text:
        return text

    def character(match: re.Match[str]) -> str:
        escape = match.group(1)
        simple = _SIMPLE_ESCAPES.get(escape)
        if simple is not None:
            return simple
        head = escape[0]
        if head in "01234567":
            return chr(int(escape, 8))
        if head not in "xuUN":
            return "\\" + escape  # not an escape: the backslash stays
        if len(escape) == 1:
            wanted = f"{_HEX_DIGITS[head]} hex digits" if head in _HEX_DIGITS else "a character's name in {}"
            reason = f"'\\{head}' must be followed by {wanted}"
        else:
            try:
                return unicodedata.lookup(escape[2:-1]) if head == "N" else chr(int(escape[1:], 16))
            except (KeyError, ValueError):
                reason = f"'\\{escape}' stands for no character"
        raise BadEscape(getattr(tok, "line", 1), getattr(tok, "column", 0) + 1 + match.start(), reason)

    return _ESCAPE.sub(character, text)


def _describe_expected(expected: set[str]) -> str:
    words = []
    for name in sorted(expected):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
        elif name.isupper() and name.isalpha():
            words.append(f"'{name.lower()}'")
        else:
            try:
                pattern = _parser().get_terminal(name).pattern.value
            except KeyError:
                pattern = name
            words.append(f"'{pattern}'")
    unique = list(dict.fromkeys(words))
    if len(unique) > 6:
        unique = [*unique[:6], "..."]
    return ", ".join(unique)


def _syntax_error(exc: UnexpectedInput, text: str) -> DslError:
    line, column = exc.line or 1, exc.column or 1
    if isinstance(exc, UnexpectedCharacters):
        at = exc.pos_in_stream if exc.pos_in_stream is not None else len(text)
        ch = text[at] if at < len(text) else ""
        hints = {
            "=": "use '==' to compare",
            "'": 'strings use double quotes: "like this"',
            "&": "use 'and'",
            "|": "use 'or'",
            "!": "use 'not' or '!='",
            '"': "the string is not closed on this line",
            ";": "rules need no ';'",
        }
        return DslError(line, column, "syntax.character", f"unexpected character {ch!r}", hints.get(ch))
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        expected = set(exc.expected)
        if token.type == "$END":
            lines = text.split("\n")
            line, column = len(lines), len(lines[-1]) + 1
            hint = "a '}' may be missing" if "RBRACE" in expected else None
            return DslError(
                line, column, "syntax.eof", f"unexpected end of text; expected {_describe_expected(expected)}", hint
            )
        hint = None
        if "THEN" in expected:
            hint = "a rule's condition is followed by 'then' and its actions"
        elif "WHEN" in expected:
            hint = "a rule needs 'when' and a condition"
        elif "SUBJECT" in expected:
            hint = "a policy starts with 'subject NAME', e.g. 'subject payment'"
        elif token.type == "NAME" and "DECISION" in expected:
            hint = "decisions are allow, challenge, review, block"
        return DslError(
            line,
            column,
            "syntax.token",
            f"unexpected {str(token)!r}; expected {_describe_expected(expected)}",
            hint,
        )
    if isinstance(exc, UnexpectedEOF):
        return DslError(line, column, "syntax.eof", "unexpected end of text", "a '}' may be missing")
    return DslError(line, column, "syntax", str(exc).splitlines()[0])


# how deep an expression may nest (a chain of 150 `and`s or `+`s nests 150 deep): the syntax tree is turned into
# ours, type-checked and generated into Python recursively, and Python's own parser refuses 200 nested brackets
MAX_DEPTH = 150


def _too_deep(tree: Tree[Any]) -> Tree[Any] | None:
    """The first node found nested deeper than ``MAX_DEPTH``, looked for without recursing."""
    stack: list[tuple[Tree[Any], int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))
    return None


@lru_cache(maxsize=1024)  # distinct texts: the features and policies of a few versions
def _parsed(text: str, start: str) -> ast.Policy | ast.Expr | DslError:
    """The syntax tree of ``text`` from rule ``start``, or its syntax error. Parsing is a pure function of the
    text and the tree is immutable, so a text is parsed once per process: a start-up reads each policy when it
    seeds versions and again when it loads the published one, and every detector feature twice."""
    try:
        tree = _parser().parse(text, start=start)
    except UnexpectedInput as exc:
        return _syntax_error(exc, text)
    deepest = _too_deep(tree)
    if deepest is not None:
        meta = deepest.meta
        return DslError(
            getattr(meta, "line", 1),
            getattr(meta, "column", 1),
            "syntax.depth",
            f"expression nested more than {MAX_DEPTH} levels deep",
            "split the condition into several rules, or use 'in [...]' for a long list of alternatives",
        )
    try:
        node: ast.Policy | ast.Expr = _ToAst().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, BadEscape):
            bad = exc.orig_exc
            return DslError(bad.line, bad.column, "syntax.escape", str(bad), "write a backslash itself as \\\\")
        what = "policy" if start == "start" else "expression"
        return DslError(1, 1, "syntax", f"cannot read {what}: {exc.orig_exc}")
    return node


def read_policy_file(path: FsPath) -> str:
    """A policy file's text. A file that is not UTF-8 raises :class:`DslErrors` at the line:column of its
    first undecodable byte (``OSError`` when it cannot be read at all)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line_start = before.rfind(b"\n") + 1
        column = len(before[line_start:].decode("utf-8", errors="replace")) + 1
        error = DslError(
            before.count(b"\n") + 1,
            column,
            "text.encoding",
            f"the text is not UTF-8 (byte 0x{data[exc.start]:02x})",
            "save the file as UTF-8",
        )
        raise DslErrors([error], str(path)) from None


def parse_policy(text: str, source: str = "<policy>") -> ast.Policy:
    """Parse a policy. Raises :class:`DslErrors` with line:column on bad syntax. A leading byte-order mark
    (which some editors write) is not part of the text."""
    policy = _parsed(text.removeprefix("\ufeff"), "start")
    if isinstance(policy, DslError):
        raise DslErrors([policy], source)
    assert isinstance(policy, ast.Policy)
    return policy


def parse_expression(text: str, source: str = "<expression>") -> ast.Expr:
    """Parse a single expression (used for detector features). Raises :class:`DslErrors` on bad syntax."""
    expr = _parsed(text, "expr")
    if isinstance(expr, DslError):
        raise DslErrors([expr], source)
    assert isinstance(expr, ast.Expr)
    return expr
