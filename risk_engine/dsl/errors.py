"""Errors of the rules language: each with a line:column, a message and, where we can, a suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DslError:
    """One problem in a policy text."""

    line: int
    column: int
    code: str
    message: str
    suggestion: str | None = None

    def __str__(self) -> str:
        hint = f" ({self.suggestion})" if self.suggestion else ""
        return f"{self.line}:{self.column}: {self.message}{hint}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for the API."""
        return {
            "line": self.line,
            "column": self.column,
            "code": self.code,
            "message": self.message,
            "suggestion": self.suggestion,
        }


class DslErrors(Exception):
    """A policy text that cannot run. Holds every error found, in text order."""

    def __init__(self, errors: Iterable[DslError], source: str = "<policy>") -> None:
        self.errors = sorted(errors, key=lambda e: (e.line, e.column))
        self.source = source
        super().__init__("\n".join(f"{source}:{e}" for e in self.errors))


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """'did you mean X?' for the closest candidate, or None."""
    pool = list(candidates)
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    if not close:
        # match on the last dotted segment too: "card_fingerprnt" -> "payment_method.card_fingerprint"
        tails = {c.rsplit(".", 1)[-1]: c for c in pool}
        hit = difflib.get_close_matches(word.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.75)
        close = [tails[hit[0]]] if hit else []
    return f"did you mean '{close[0]}'?" if close else None
