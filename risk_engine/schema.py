"""Subject schemas: the typed fields of each subject's flat record, which rules and detectors read.

Every subject (payment now; review, merchant, dispute later) is flattened into one dict of scalars keyed by
dotted paths (``buyer.account_age``). PII values appear there only as blind-index tokens, so the record can
be stored, replayed and backtested without exposing anyone.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from risk_engine.vault import PiiKind

ATTRIBUTES_PREFIX = "attributes."  # a caller-declared attribute ``V1`` is the record's field ``attributes.V1``


class FieldType(StrEnum):
    """Types of the rules language."""

    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"
    DURATION = "duration"
    PII = "pii"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One readable field of a subject."""

    path: str
    type: FieldType
    description: str = ""
    pii_kind: PiiKind | None = None


@dataclass(frozen=True)
class SubjectSchema:
    """The fields a subject's rules and detectors may read."""

    name: str
    fields: dict[str, FieldSpec] = field(default_factory=dict)

    def with_attributes(self, attributes: dict[str, FieldType]) -> SubjectSchema:
        """This schema plus caller-declared ``attributes.*`` fields."""
        extra = {
            f"attributes.{name}": FieldSpec(f"attributes.{name}", ftype, "caller-declared attribute")
            for name, ftype in attributes.items()
        }
        return SubjectSchema(self.name, {**self.fields, **extra})

    @cached_property
    def number_attributes(self) -> frozenset[str]:
        """Names of the declared numeric attributes."""
        return frozenset(name for name, t in self.attribute_types.items() if t is FieldType.NUMBER)

    @cached_property
    def attribute_types(self) -> dict[str, FieldType]:
        """Declared attributes, by bare name."""
        prefix = ATTRIBUTES_PREFIX
        return {p[len(prefix) :]: f.type for p, f in self.fields.items() if p.startswith(prefix)}


SELLER_FIELDS = (
    FieldSpec("seller.credit", FieldType.NUMBER, "the seller's credit score, 0-1000, before this event"),
    FieldSpec("seller.tier", FieldType.STRING, "the seller's credit tier: new, bronze, silver, gold, top"),
    FieldSpec("seller.flag", FieldType.STRING, "the seller's merchant flag: ok, watch, investigate, restrict_payouts"),
)


class ConfigError(ValueError):
    """A configuration file is malformed."""


ATTRIBUTE_TYPES = {"number": FieldType.NUMBER, "string": FieldType.STRING, "bool": FieldType.BOOL}


def load_attribute_declarations(path: Path) -> dict[str, dict[str, FieldType]]:
    """Read ``subjects.toml``: ``[payment.attributes] V1 = "number"`` per subject."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # not TOML, or not UTF-8 text
        raise ConfigError(f"{path}: {exc}") from exc
    result: dict[str, dict[str, FieldType]] = {}
    for subject, body in data.items():
        attrs = body.get("attributes", {}) if isinstance(body, dict) else {}
        declared: dict[str, FieldType] = {}
        for name, type_name in attrs.items():
            if not name.isidentifier():
                raise ConfigError(f"{path}: attribute name {name!r} of {subject} is not an identifier")
            if type_name not in ATTRIBUTE_TYPES:
                raise ConfigError(
                    f"{path}: attribute {subject}.{name} has type {type_name!r}; "
                    f"expected one of {sorted(ATTRIBUTE_TYPES)}"
                )
            declared[name] = ATTRIBUTE_TYPES[type_name]
        result[subject] = declared
    return result
