"""Labelled CSV files as events of the public API (the layouts of ../shared/data work as they are).

The ULB card data (``Time``, ``V1..V28``, ``Amount``, ``Class``, optional ``weight``) becomes payments:
``Time`` seconds after a fixed start, ``Amount`` in euro cents, ``V1..V28`` as declared attributes. It has no
identities, so each row gets a buyer, card and device drawn deterministically from its position (a few
thousand of each, some reused), which gives the velocity windows realistic work without inventing fraud.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ULB_START = datetime(2013, 9, 1, tzinfo=UTC)
LABEL_COLUMNS = ("Class", "FLAG", "deceptive")


@dataclass(frozen=True, slots=True)
class LabelledEvent:
    """One row: the request body to score, its label and its sample weight."""

    body: dict[str, Any]
    label: int
    weight: float


def _pick(seed: str, n: int) -> int:
    return zlib.crc32(seed.encode()) % n


def ulb_payments(path: Path, *, prefix: str = "ulb", time_offset_s: float = 0.0) -> Iterator[LabelledEvent]:
    """Payments from a ULB-layout CSV, in file order."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        for i, row in enumerate(reader):
            label = int(float(row.get("Class", "0") or 0))
            weight = float(row.get("weight", "1") or 1)
            cents = int((Decimal(row["Amount"]) * 100).to_integral_value())
            occurred = ULB_START + timedelta(seconds=float(row["Time"]) + time_offset_s)
            buyer = _pick(f"b{i}", 3000)
            card = buyer if _pick(f"c{i}", 10) else _pick(f"cx{i}", 4000)
            device = buyer if _pick(f"d{i}", 8) else _pick(f"dx{i}", 3000)
            attributes = {k: float(v) for k, v in row.items() if k.startswith("V") and k[1:].isdigit()}
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
            yield LabelledEvent(body, label, weight)
