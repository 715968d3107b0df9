"""Labelled CSV files as events of the public API (the layouts of ../shared/data work as they are).

The ULB card data (``Time``, ``V1..V28``, ``Amount``, ``Class``, optional ``weight``) becomes payments:
``Time`` seconds after a fixed start, ``Amount`` in euro cents, ``V1..V28`` as declared attributes. It has no
identities, so each row gets a buyer, card and device drawn deterministically from its position (a few
thousand of each, some reused), which gives the velocity windows realistic work without inventing fraud.
A `weight` other than 1 becomes the payment's `sample_weight`.
"""

from __future__ import annotations

import csv
import math
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ULB_START = datetime(2013, 9, 1, tzinfo=UTC)
LABEL_COLUMNS = ("Class", "FLAG", "deceptive")


@dataclass(frozen=True, slots=True)
class LabelledEvent:
    """One row: the request body to score, its label, its sample weight and its line in the file."""

    body: dict[str, Any]
    label: int
    weight: float
    line: int = 0


class DatasetError(ValueError):
    """A labelled CSV without the layout its subject needs: the file, the line and what is wrong there."""


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row)`` of a CSV file whose header has every ``required`` column."""
    line = 1
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "") if header else "nothing"
                raise DatasetError(f"{path}: no column {', '.join(missing)} (its header has {shown})")
            for row in reader:
                line = reader.line_num
                yield line, row
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at {exc.start})") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}:{line}: not CSV: {exc}") from None


def _number(path: Path, line: int, row: dict[str, str], column: str, default: str | None = None) -> float:
    """A numeric cell (``default`` when the column is absent or the cell empty), or a DatasetError naming it."""
    value = row.get(column)
    if value is None or value.strip() == "":
        if default is None:
            raise DatasetError(f"{path}:{line}: column {column} is empty")
        value = default
    try:
        number = float(value)
    except ValueError:
        raise DatasetError(f"{path}:{line}: column {column}: {value[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise DatasetError(f"{path}:{line}: column {column}: {value[:40]!r} is not a finite number")
    return number


def _pick(seed: str, n: int) -> int:
    return zlib.crc32(seed.encode()) % n


def ulb_payments(path: Path, *, prefix: str = "ulb", time_offset_s: float = 0.0) -> Iterator[LabelledEvent]:
    """Payments from a ULB-layout CSV, in file order (a DatasetError names the first line it cannot read)."""
    for i, (line, row) in enumerate(_rows(path, ("Time", "Amount"))):
        label = int(_number(path, line, row, "Class", "0"))
        weight = _number(path, line, row, "weight", "1")
        _number(path, line, row, "Amount")  # a finite number, which Decimal then reads exactly
        cents = int((Decimal(row["Amount"]) * 100).to_integral_value())
        occurred = ULB_START + timedelta(seconds=_number(path, line, row, "Time") + time_offset_s)
        buyer = _pick(f"b{i}", 3000)
        card = buyer if _pick(f"c{i}", 10) else _pick(f"cx{i}", 4000)
        device = buyer if _pick(f"d{i}", 8) else _pick(f"dx{i}", 3000)
        attributes = {k: _number(path, line, row, k) for k in row if k and k.startswith("V") and k[1:].isdigit()}
        body = {
            "payment_id": f"{prefix}_{i}",
            "occurred_at": occurred.isoformat().replace("+00:00", "Z"),
            "amount": {"value": cents, "currency": "EUR"},
            "order_id": f"{prefix}_o{i}",
            "seller_id": f"s{_pick(f's{i}', 400)}",
            "buyer": {
                "id": f"b{buyer}",
                "created_at": "2012-01-01T00:00:00Z",
                "verified": bool(buyer % 3),
                "email": f"buyer{buyer}@example.com",
            },
            "payment_method": {
                "type": "card",
                "card_bin": "400000",
                "card_last4": f"{card % 10000:04d}",
                "card_fingerprint": f"fp_{card}",
                "issuer_country": "BE",
            },
            "device": {"id": f"dev_{device}", "ip": f"10.{device % 250}.{buyer % 250}.{card % 250}"},
            "shipping_address": {
                "country": "BE",
                "city": "Brussels",
                "postal_code": "1000",
                "line1": f"{buyer} Rue Exemple",
            },
            "billing_country": "BE",
            "item_count": 1,
            "channel": "web",
            "attributes": attributes,
        }
        if weight != 1.0:  # a sampled file: each row stands for ``weight`` payments
            body["sample_weight"] = weight
        yield LabelledEvent(body, label, weight, line)


def attribute_name(column: str) -> str:
    """A CSV column as an attribute name: ``" ERC20 uniq sent addr.1"`` -> ``erc20_uniq_sent_addr_1``."""
    return re.sub(r"[^a-z0-9]+", "_", column.strip().lower()).strip("_")


ETHEREUM_STRING_COLUMNS = frozenset({"erc20_most_sent_token_type", "erc20_most_rec_token_type"})
ETHEREUM_SKIPPED = frozenset({"index", "flag"})
ETHEREUM_START = datetime(2020, 1, 1, tzinfo=UTC)


def ethereum_accounts(path: Path, *, prefix: str = "eth", seed: int = 2026) -> Iterator[LabelledEvent]:
    """Accounts from the Ethereum accounts CSV (``FLAG`` is the label), in a shuffled but fixed order: the file
    is sorted by its label, which no stream is. Empty cells are left out (an account with no ERC20 activity has
    no ERC20 figures); columns become attributes named by :func:`attribute_name`."""
    rows = list(_rows(path, ("FLAG",)))
    random.Random(seed).shuffle(rows)
    for i, (line, row) in enumerate(rows):
        label = int(_number(path, line, row, "FLAG"))
        attributes: dict[str, Any] = {}
        for column, value in row.items():
            name = attribute_name(column)
            if name in ETHEREUM_SKIPPED or value is None or value.strip() == "":
                continue
            if name in ETHEREUM_STRING_COLUMNS:
                attributes[name] = value.strip()[:128]
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                attributes[name] = number
        body = {
            "account_id": f"{prefix}_{i}",
            "occurred_at": (ETHEREUM_START + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
            "role": "wallet",
            "attributes": attributes,
        }
        yield LabelledEvent(body, label, _number(path, line, row, "weight", "1"), line)


OPSPAM_START = datetime(2011, 6, 1, tzinfo=UTC)


def opspam_reviews(path: Path, *, prefix: str = "rev", seed: int = 2026) -> Iterator[LabelledEvent]:
    """Reviews from the deceptive opinion spam corpus (``deceptive`` is the label), shuffled in a fixed order
    (the file is grouped by hotel and label). Each review gets its own reviewer (the corpus has no identities),
    the hotel as item and seller, a rating from its polarity (positive 5, negative 1) and a time a minute
    after the previous one."""
    rows = list(_rows(path, ("text", "deceptive")))
    random.Random(seed).shuffle(rows)
    for i, (line, row) in enumerate(rows):
        hotel = attribute_name(row.get("hotel", "hotel")) or "hotel"
        body = {
            "review_id": f"{prefix}_{i}",
            "occurred_at": (OPSPAM_START + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
            "item_id": hotel,
            "seller_id": hotel,
            "reviewer": {"id": f"{prefix}_reviewer_{i}"},
            "rating": 5 if row.get("polarity") == "positive" else 1,
            "text": row["text"] or "",
        }
        label = int(_number(path, line, row, "deceptive"))
        yield LabelledEvent(body, label, _number(path, line, row, "weight", "1"), line)
