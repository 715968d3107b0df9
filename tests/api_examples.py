"""The example requests of api/examples/, in order, and how to compare answers with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import REPO, payment

EXAMPLES = REPO / "api" / "examples"
VOLATILE = {"elapsed_ms", "received_at", "added_by"}

REQUESTS: list[dict[str, Any]] = [
    {"name": "01_score_payment", "method": "POST", "path": "/v1/payments/score", "role": "scorer", "body": payment()},
    {
        "name": "02_score_payment_replay",
        "method": "POST",
        "path": "/v1/payments/score",
        "role": "scorer",
        "body": payment(),
    },
    {
        "name": "03_score_risky_payment",
        "method": "POST",
        "path": "/v1/payments/score",
        "role": "scorer",
        "body": payment(
            **{
                "payment_id": "pay_0002",
                "order_id": "ord_0002",
                "occurred_at": "2026-11-22T03:20:00Z",
                "buyer.id": "b_new",
                "buyer.created_at": "2026-11-22T01:00:00Z",
                "buyer.verified": False,
                "buyer.email": "x81@mailinator.com",
                "amount.value": 680000,
                "billing_country": "US",
                "payment_method.issuer_country": "US",
                "payment_method.card_fingerprint": "fp_77aa",
            }
        ),
    },
    {"name": "04_get_payment", "method": "GET", "path": "/v1/payments/pay_0001", "role": "scorer"},
    {
        "name": "05_record_label",
        "method": "POST",
        "path": "/v1/labels",
        "role": "scorer",
        "body": {
            "label_id": "lbl_0001",
            "payment_id": "pay_0002",
            "label": "chargeback",
            "source": "issuer",
            "occurred_at": "2026-12-20T09:00:00Z",
        },
    },
    {
        "name": "06_add_list_entry",
        "method": "POST",
        "path": "/v1/lists/blocked_devices/entries",
        "role": "analyst",
        "body": {"value": "dev_bad_1", "note": "linked to chargeback lbl_0001"},
    },
    {"name": "07_list_lists", "method": "GET", "path": "/v1/lists", "role": "analyst"},
    {"name": "08_list_models", "method": "GET", "path": "/v1/models", "role": "scorer"},
    {
        "name": "09_invalid_payment",
        "method": "POST",
        "path": "/v1/payments/score",
        "role": "scorer",
        "body": payment(
            **{"payment_id": "pay_bad", "amount.value": -100, "amount.currency": "ABC", "payment_method.cvv": "123"}
        ),
    },
    {"name": "10_missing_key", "method": "POST", "path": "/v1/payments/score", "role": None, "body": payment()},
    {"name": "11_healthz", "method": "GET", "path": "/healthz", "role": None},
]


def strip(value: Any) -> Any:
    """The answer without fields that change from run to run."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def example_path(name: str) -> Path:
    return EXAMPLES / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(example_path(name).read_text())
    return data
