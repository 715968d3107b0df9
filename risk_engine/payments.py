"""The payment subject: the payment flows' contract (pydantic) and its flat record."""

from __future__ import annotations

import math
import re
from collections.abc import ValuesView
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from risk_engine.features.lists import canonical_ip, ip_prefix
from risk_engine.money import UnknownCurrencyError, currency_exponent
from risk_engine.schema import SELLER_FIELDS, FieldSpec, FieldType, SubjectSchema
from risk_engine.vault import PiiKind, Vault

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]
ShortText = Annotated[str, Field(max_length=256)]
# free text bound for a text column: no NUL, which PostgreSQL's text cannot hold
Text = Annotated[str, Field(pattern=r"^[^\x00]*$")]
AttributeValue = float | int | str | bool
ATTRIBUTE_NUMBER_LIMIT = 1e15  # an attribute number's largest magnitude: amounts' bound, JSON-safe as an integer
EARLIEST_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)


def _looks_like_a_number(value: Any) -> bool:
    if isinstance(value, int | float):  # bool too: pydantic refuses it anyway
        return True
    return isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit()


def _time_as_text(value: Any) -> Any:
    """Refuse a number (or a string of digits) where a time is due. pydantic would take it as a Unix time and
    guess from its size whether it counts seconds or milliseconds: a caller's 0 for "unknown" would become
    1970-01-01, a buyer account 56 years old, which the trusted-buyer rules reward."""
    if _looks_like_a_number(value):
        raise PydanticCustomError(
            "time_as_text",
            "must be an RFC 3339 date-time with its UTC offset, e.g. 2026-11-22T10:15:00Z, not a number (Unix time)",
        )
    return value


def _date_as_text(value: Any) -> Any:
    """As ``_time_as_text``, for a day: pydantic would take 0 as 1970-01-01."""
    if _looks_like_a_number(value):
        raise PydanticCustomError("date_as_text", "must be a date as text, e.g. 2026-11-22, not a number")
    return value


# a time with its UTC offset, within what storage and ``datetime.timestamp`` take once turned into UTC
# (9999-12-31T23:59:59-05:00 is past the year 9999 in UTC); as text, never a number
Instant = Annotated[AwareDatetime, Field(ge=EARLIEST_INSTANT, lt=LATEST_INSTANT), BeforeValidator(_time_as_text)]
# a UTC day within the same bounds, as text
Day = Annotated[date, Field(ge=EARLIEST_INSTANT.date(), lt=LATEST_INSTANT.date()), BeforeValidator(_date_as_text)]


def looks_like_card_number(text: str) -> bool:
    """True for 13-19 digits (spaces or dashes allowed) passing the Luhn check: a full PAN."""
    if len(text) < 13:  # most tokens and fingerprints: too short to hold one
        return False
    digits = _SEPARATORS.sub("", text)
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_SEPARATORS = re.compile(r"[\s\-]")


def _check_attribute_values(v: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    """No full card number in a string; every number finite (JSON's NaN and Infinity, which the parser takes,
    would stay in a detector's running means for good) and within ``ATTRIBUTE_NUMBER_LIMIT``. One check of the
    whole mapping (per-value validators cost a call each); an error names the attribute in its context, which
    the service's 422 turns into the field ``attributes.KEY``."""
    if not v:
        return v
    try:  # numbers only, the usual case, in one C-level pass: a string raises, as does an int past float's range
        # within the limit as a vector, so each one is; NaN or an infinity makes the norm NaN or infinite
        if math.hypot(*cast("ValuesView[float]", v.values())) <= ATTRIBUTE_NUMBER_LIMIT:
            return v
    except (TypeError, OverflowError):
        pass
    for key, value in v.items():
        if isinstance(value, str):
            if looks_like_card_number(value):
                raise PydanticCustomError(
                    "attribute_card_number",
                    "attribute {attribute!r} looks like a full card number; never send the PAN",
                    {"attribute": key},
                )
        elif not -ATTRIBUTE_NUMBER_LIMIT <= value <= ATTRIBUTE_NUMBER_LIMIT:  # False for NaN too
            raise PydanticCustomError(
                "attribute_out_of_range",
                "attribute {attribute!r} must be a finite number from -1e15 to 1e15 (send a larger id or count as a"
                " string)",
                {"attribute": key},
            )
    return v


# Caller-declared fields of any subject (checked against subjects.toml by the engine); never a card number.
Attributes = Annotated[
    dict[Annotated[str, Field(max_length=64)], AttributeValue], AfterValidator(_check_attribute_values)
]


class Strict(BaseModel):
    """Unknown fields are rejected, so a CVV or card number sent by mistake is never accepted."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Amount(Strict):
    value: int = Field(ge=0, le=10**15, description="Minor units (fen, cents): 129900 is 1,299.00 CNY.")
    currency: str = Field(min_length=3, max_length=3, description="ISO 4217 code.")

    @field_validator("value", mode="before")
    @classmethod
    def _integer_only(cls, v: Any) -> Any:
        if isinstance(v, float | str | bool):
            raise ValueError("must be an integer number of minor units (no floats, no strings)")
        return v

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, v: str) -> str:
        try:
            currency_exponent(v)
        except UnknownCurrencyError as exc:
            raise ValueError(str(exc)) from None
        return v


class Buyer(Strict):
    id: Id
    created_at: Instant | None = None
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None
    phone: Annotated[str, Field(max_length=32, pattern=r"^\+?[0-9 ()\-]{5,31}$")] | None = None
    name: ShortText | None = None
    verified: bool = False


class PaymentMethod(Strict):
    type: Literal["card", "wallet", "bank_transfer", "balance", "cod", "other"]
    card_bin: Annotated[str, Field(pattern=r"^[0-9]{6,8}$")] | None = None
    card_last4: Annotated[str, Field(pattern=r"^[0-9]{4}$")] | None = None
    card_fingerprint: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    issuer_country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None

    @field_validator("card_fingerprint")
    @classmethod
    def _not_a_pan(cls, v: str | None) -> str | None:
        if v is not None and looks_like_card_number(v):
            raise ValueError("looks like a full card number; send a token or fingerprint, never the PAN")
        return v


IpAddress = Annotated[str, Field(max_length=64), AfterValidator(canonical_ip)]


def contains_card_number(text: str) -> bool:
    """True if a free text holds a run of 13-19 digits (spaces or dashes allowed) that passes the Luhn check."""
    return any(looks_like_card_number(m.group()) for m in _DIGIT_RUN.finditer(text))


_DIGIT_RUN = re.compile(r"\d[\d \-]{11,24}\d")


class Device(Strict):
    id: Id | None = None
    ip: IpAddress | None = None
    user_agent: Annotated[str, Field(max_length=512)] | None = None


class Address(Strict):
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    city: ShortText | None = None
    postal_code: Annotated[str, Field(max_length=16)] | None = None
    line1: ShortText | None = None
    line2: ShortText | None = None


class PaymentIn(Strict):
    """A payment to score."""

    payment_id: Id
    occurred_at: Instant
    amount: Amount
    order_id: Id | None = None
    seller_id: Id | None = None
    buyer: Buyer
    payment_method: PaymentMethod
    device: Device | None = None
    shipping_address: Address | None = None
    billing_country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    item_count: int = Field(default=1, ge=0, le=100_000)
    channel: Literal["app", "web", "mini_program", "pos", "api", "other"] = "web"
    attributes: Attributes = Field(default_factory=dict, max_length=256)
    sample_weight: float = Field(
        default=1.0,
        gt=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="How many payments this one stands for, when the caller sends a sample of its traffic "
        "(e.g. 25 for each legitimate payment of a 1-in-25 sample): the detectors learn the whole stream's "
        "statistics from the sample. Rules, velocity counts and labels count each payment once.",
    )


def _spec(path: str, ftype: FieldType, description: str, pii: PiiKind | None = None) -> FieldSpec:
    return FieldSpec(path, ftype, description, pii)


N, S, B, D, P = FieldType.NUMBER, FieldType.STRING, FieldType.BOOL, FieldType.DURATION, FieldType.PII

PAYMENT_SCHEMA = SubjectSchema(
    "payment",
    {
        s.path: s
        for s in [
            _spec("payment_id", S, "caller's payment id"),
            _spec("order_id", S, "order id"),
            _spec("seller_id", S, "seller id"),
            _spec("hour", N, "hour of day of occurred_at, UTC, 0-23"),
            _spec("weekday", N, "day of week of occurred_at, Monday 0"),
            _spec("amount.value", N, "amount in minor units"),
            _spec("amount.major", N, "amount in major units (yuan, euros)"),
            _spec("amount.base", N, "amount in the base currency's major units (rules/currencies.toml)"),
            _spec("amount.currency", S, "ISO 4217 code"),
            _spec("buyer.id", S, "buyer id"),
            _spec("buyer.account_age", D, "time since the buyer's account was created"),
            _spec("buyer.verified", B, "buyer passed identity verification"),
            _spec("buyer.email", P, "buyer e-mail (blind index)", PiiKind.EMAIL),
            _spec("buyer.email_domain", S, "domain of the buyer's e-mail"),
            _spec("buyer.phone", P, "buyer phone (blind index)", PiiKind.PHONE),
            _spec("buyer.name", P, "buyer name (blind index)", PiiKind.NAME),
            _spec("buyer.has_email", B, "an e-mail was given"),
            _spec("buyer.has_phone", B, "a phone was given"),
            _spec("payment_method.type", S, "card, wallet, bank_transfer, balance, cod, other"),
            _spec("payment_method.card_bin", S, "first 6-8 digits of the card"),
            _spec("payment_method.card_last4", S, "last 4 digits of the card"),
            _spec("payment_method.card_fingerprint", P, "card token (blind index)", PiiKind.CARD),
            _spec("payment_method.issuer_country", S, "card issuer country"),
            _spec("device.id", S, "device id"),
            _spec("device.ip", P, "IP address (blind index)", PiiKind.IP),
            _spec("device.ip_version", N, "4 or 6"),
            _spec("device.ip_prefix", S, "the IP's /24 (IPv4) or /48 (IPv6) network, for ip_range lists"),
            _spec("device.user_agent", S, "user agent"),
            _spec("shipping.country", S, "shipping country"),
            _spec("shipping.city", S, "shipping city"),
            _spec("shipping.postal_code", S, "shipping postal code"),
            _spec("shipping.address", P, "full shipping address (blind index)", PiiKind.ADDRESS),
            _spec("billing_country", S, "billing country"),
            _spec("item_count", N, "number of items"),
            _spec("channel", S, "app, web, mini_program, pos, api, other"),
            *SELLER_FIELDS,
        ]
    },
)

Record = dict[str, Any]


def flatten_payment(p: PaymentIn, vault: Vault) -> tuple[Record, dict[str, str]]:
    """The payment's flat record (PII as blind indexes) and its PII bundle to seal."""
    occurred = p.occurred_at
    record: Record = {
        "payment_id": p.payment_id,
        "order_id": p.order_id,
        "seller_id": p.seller_id,
        "hour": occurred.astimezone(UTC).hour,
        "weekday": occurred.weekday(),
        "amount.value": p.amount.value,
        "amount.major": p.amount.value / 10 ** currency_exponent(p.amount.currency),
        "amount.currency": p.amount.currency,
        "buyer.id": p.buyer.id,
        "buyer.verified": p.buyer.verified,
        "buyer.has_email": p.buyer.email is not None,
        "buyer.has_phone": p.buyer.phone is not None,
        "payment_method.type": p.payment_method.type,
        "payment_method.card_bin": p.payment_method.card_bin,
        "payment_method.card_last4": p.payment_method.card_last4,
        "payment_method.issuer_country": p.payment_method.issuer_country,
        "billing_country": p.billing_country,
        "item_count": p.item_count,
        "channel": p.channel,
    }
    pii: dict[str, str] = {}
    bi = vault.blind_index
    if p.buyer.created_at is not None:
        record["buyer.account_age"] = max((occurred - p.buyer.created_at).total_seconds(), 0.0)
    if p.buyer.email is not None:
        pii["buyer.email"] = p.buyer.email
        record["buyer.email"] = bi(PiiKind.EMAIL, p.buyer.email)
        record["buyer.email_domain"] = p.buyer.email.rsplit("@", 1)[1].lower()
    if p.buyer.phone is not None:
        pii["buyer.phone"] = p.buyer.phone
        record["buyer.phone"] = bi(PiiKind.PHONE, p.buyer.phone)
    if p.buyer.name is not None:
        pii["buyer.name"] = p.buyer.name
        record["buyer.name"] = bi(PiiKind.NAME, p.buyer.name)
    if p.payment_method.card_fingerprint is not None:
        pii["payment_method.card_fingerprint"] = p.payment_method.card_fingerprint
        record["payment_method.card_fingerprint"] = bi(PiiKind.CARD, p.payment_method.card_fingerprint)
    if p.device is not None:
        record["device.id"] = p.device.id
        record["device.user_agent"] = p.device.user_agent
        if p.device.ip is not None:
            pii["device.ip"] = p.device.ip
            record["device.ip"] = bi(PiiKind.IP, p.device.ip)
            record["device.ip_version"] = 6 if ":" in p.device.ip else 4
            record["device.ip_prefix"] = ip_prefix(p.device.ip)
    if p.shipping_address is not None:
        a = p.shipping_address
        record["shipping.country"] = a.country
        record["shipping.city"] = a.city
        record["shipping.postal_code"] = a.postal_code
        if a.line1 or a.line2:
            if a.line1:
                pii["shipping.line1"] = a.line1
            if a.line2:
                pii["shipping.line2"] = a.line2
            full = " ".join(x for x in (a.line1, a.line2, a.city, a.postal_code, a.country) if x)
            record["shipping.address"] = bi(PiiKind.ADDRESS, full)
    if p.sample_weight != 1.0:  # absent otherwise: records (and request hashes) of unweighted payments unchanged
        record["sample_weight"] = p.sample_weight
    attributes = p.attributes
    if attributes:
        names = tuple(attributes)
        keys = _ATTRIBUTE_KEYS.get(names)
        if keys is None:
            keys = tuple("attributes." + name for name in names)
            if len(_ATTRIBUTE_KEYS) < 1_000:  # a caller sends the same few sets; never let odd input grow it
                _ATTRIBUTE_KEYS[names] = keys
        record.update(zip(keys, attributes.values(), strict=True))
    return record, pii


# ("V1", "V2", ...) -> ("attributes.V1", "attributes.V2", ...): the record's keys for a set of attribute names,
# built once per set a caller sends, so a payment's attributes are copied in without a Python loop
_ATTRIBUTE_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}


PII_FIELD_KINDS: dict[str, PiiKind] = {
    "buyer.email": PiiKind.EMAIL,
    "buyer.phone": PiiKind.PHONE,
    "buyer.name": PiiKind.NAME,
    "payment_method.card_fingerprint": PiiKind.CARD,
    "device.ip": PiiKind.IP,
    "shipping.line1": PiiKind.ADDRESS,
    "shipping.line2": PiiKind.ADDRESS,
}
