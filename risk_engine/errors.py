"""The errors the engine's callers answer for: the HTTP layer maps each to its status (``service/errors.py``)."""

from __future__ import annotations

from typing import Any


class InvalidInput(Exception):
    """Input that passed the schema but not the subject's configuration (attributes)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['reason']}" for e in errors))


class Conflict(Exception):
    """An idempotency key reused with a different request."""


class NotFound(Exception):
    """The thing asked for does not exist."""
