"""The example requests of api/examples/, in order, and how to compare answers with them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, account, payment

EXAMPLES = REPO / "api" / "examples"
VOLATILE_PREFIXES = ("backtest_",)
T_LABEL = "2026-12-20T09:00:00Z"  # when the outcomes in the label examples happened
VOLATILE = {
    "elapsed_ms",
    "received_at",
    "added_by",
    "started_by",
    "at",
    "actor",
    "created_at",
    "created_by",
    "started_at",
    "finished_at",
    "events_per_s",
    "replay_events_per_s",
    "key_id",
    "key",
    "revoked_at",
}
JOB_ID = "{job_id}"  # in a path: the id of the job the previous example started
KEY_ID = "{key_id}"  # in a path: the id of the key the previous example created
SMALL_POLICY = """subject payment

thresholds { challenge at 30  review at 60  block at 85 }

rule new_account_large_ticket {
  description "Account less than a day old paying 3,000 or more"
  when buyer.account_age < 1d and amount.major >= 3000
  then score +45, reason NEW_ACCOUNT_LARGE_TICKET
}
"""

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
    {"name": "12_list_policy_versions", "method": "GET", "path": "/v1/policies/payment", "role": "analyst"},
    {
        "name": "13_create_draft",
        "method": "POST",
        "path": "/v1/policies/payment/drafts",
        "role": "analyst",
        "body": {"text": SMALL_POLICY},
    },
    {
        "name": "14_draft_that_does_not_check",
        "method": "POST",
        "path": "/v1/policies/payment/drafts",
        "role": "analyst",
        "body": {"text": SMALL_POLICY.replace("buyer.account_age < 1d", "buyer.acount_age < 1")},
    },
    {"name": "15_get_policy_version", "method": "GET", "path": "/v1/policies/payment/versions/2", "role": "analyst"},
    {
        "name": "16_diff_policy_versions",
        "method": "GET",
        "path": "/v1/policies/payment/diff?from=1&to=2",
        "role": "analyst",
    },
    {
        "name": "17_publish_policy_version",
        "method": "POST",
        "path": "/v1/policies/payment/versions/2/publish",
        "role": "analyst",
    },
    {
        "name": "18_roll_back_policy",
        "method": "POST",
        "path": "/v1/policies/payment/rollback",
        "role": "analyst",
        "body": {"to_version": 1},
    },
    {"name": "19_audit_log", "method": "GET", "path": "/v1/audit?limit=3", "role": "analyst"},
    {
        "name": "20_start_backtest",
        "method": "POST",
        "path": "/v1/policies/payment/drafts/2/backtest",
        "role": "analyst",
        "body": {"since": "30d"},
    },
    {"name": "21_get_job", "method": "GET", "path": f"/v1/jobs/{JOB_ID}", "role": "analyst", "poll": True},
    {"name": "22_cancel_job", "method": "DELETE", "path": f"/v1/jobs/{JOB_ID}", "role": "analyst"},
    {"name": "23_start_shadow", "method": "POST", "path": "/v1/policies/payment/versions/2/shadow", "role": "analyst"},
    {
        "name": "24_score_while_in_shadow",
        "method": "POST",
        "path": "/v1/payments/score",
        "role": "scorer",
        "body": payment(
            **{
                "payment_id": "pay_0003",
                "order_id": "ord_0003",
                "occurred_at": "2026-11-22T11:00:00Z",
                "buyer.id": "b_9",
                "buyer.created_at": "2026-11-21T20:00:00Z",
                "amount.value": 450000,
                "payment_method.card_fingerprint": "fp_33cc",
            }
        ),
    },
    {"name": "25_shadow_report", "method": "GET", "path": "/v1/policies/payment/shadow", "role": "analyst"},
    {"name": "26_stop_shadow", "method": "DELETE", "path": "/v1/policies/payment/shadow", "role": "analyst"},
    {
        "name": "27_rule_statistics",
        "method": "GET",
        "path": "/v1/policies/payment/rules/stats?days=30",
        "role": "analyst",
    },
    {
        "name": "27b_import_list_entries",
        "method": "POST",
        "path": "/v1/lists/blocked_devices/entries/import",
        "role": "analyst",
        "body": {"values": ["dev_bad_2", "dev_bad_3", "dev_bad_1"], "note": "devices of case 8812"},
    },
    {
        "name": "27c_lookup_list_entry",
        "method": "POST",
        "path": "/v1/lists/blocked_devices/entries/lookup",
        "role": "analyst",
        "body": {"value": "dev_bad_2"},
    },
    {
        "name": "28_list_entries",
        "method": "GET",
        "path": "/v1/lists/blocked_devices/entries?limit=2",
        "role": "analyst",
    },
    {
        "name": "29_remove_list_entry",
        "method": "DELETE",
        "path": "/v1/lists/blocked_devices/entries",
        "role": "analyst",
        "body": {"value": "dev_bad_1"},
    },
    {
        "name": "30_score_account",
        "method": "POST",
        "path": "/v1/accounts/score",
        "role": "scorer",
        "body": account(),
    },
    {
        "name": "31_label_account",
        "method": "POST",
        "path": "/v1/labels",
        "role": "scorer",
        "body": {
            "label_id": "lab_acct_1",
            "subject": "account",
            "payment_id": "acct_review_0001",
            "label": "legitimate",
            "occurred_at": "2026-11-23T09:00:00Z",
        },
    },
    {
        "name": "32_fit_population_needs_events",
        "method": "POST",
        "path": "/v1/models/account_population/fit",
        "role": "analyst",
        "body": {},
    },
    {"name": "33_models", "method": "GET", "path": "/v1/models", "role": "scorer"},
    {"name": "34_get_account", "method": "GET", "path": "/v1/accounts/acct_review_0001", "role": "scorer"},
    {
        "name": "35_score_review",
        "method": "POST",
        "path": "/v1/reviews/score",
        "role": "scorer",
        "body": {
            "review_id": "rev_0001",
            "occurred_at": "2026-11-25T08:00:00Z",
            "order_id": "ord_0001",
            "item_id": "item_77",
            "seller_id": "s_42",
            "reviewer": {
                "id": "b_7",
                "created_at": "2025-03-01T00:00:00Z",
                "device_id": "dev_1",
                "ip": "203.0.113.7",
            },
            "rating": 5,
            "detailed_ratings": {"description": 5, "service": 5, "logistics": 4},
            "text": "Fits well and arrived in two days. The colour is a little darker than in the photos.",
        },
    },
    {
        "name": "36_label_review",
        "method": "POST",
        "path": "/v1/labels",
        "role": "scorer",
        "body": {
            "label_id": "mod_rev_0001",
            "subject": "review",
            "payment_id": "rev_0001",
            "label": "genuine",
            "occurred_at": "2026-11-25T09:00:00Z",
            "source": "moderation",
        },
    },
    {"name": "37_get_review", "method": "GET", "path": "/v1/reviews/rev_0001", "role": "scorer"},
    {
        "name": "38_merchant_event",
        "method": "POST",
        "path": "/v1/merchants/s_42/events",
        "role": "scorer",
        "body": {
            "event_id": "mev_0001",
            "occurred_at": "2026-11-22T11:00:00Z",
            "type": "order_shipped",
            "order_id": "ord_0001",
            "late": False,
        },
    },
    {
        "name": "39_merchant_violation",
        "method": "POST",
        "path": "/v1/merchants/s_42/events",
        "role": "scorer",
        "body": {
            "event_id": "mev_0002",
            "occurred_at": "2026-11-23T09:00:00Z",
            "type": "violation",
            "points": 12,
            "expires_at": "2027-11-23T09:00:00Z",
        },
    },
    {"name": "40_merchant_risk", "method": "GET", "path": "/v1/merchants/s_42/risk", "role": "scorer"},
    {
        "name": "40b_merchants_rollup",
        "method": "POST",
        "path": "/v1/merchants/rollup",
        "role": "analyst",
        "body": {"day": "2026-11-22"},
    },
    {"name": "41_seller_credit", "method": "GET", "path": "/v1/sellers/s_42/credit", "role": "scorer"},
    {
        "name": "42_create_key",
        "method": "POST",
        "path": "/v1/keys",
        "role": "admin",
        "body": {"role": "scorer", "name": "checkout-service", "request_id": "key_req_0001"},
    },
    {"name": "43_list_keys", "method": "GET", "path": "/v1/keys?active=true", "role": "admin"},
    {"name": "44_revoke_key", "method": "POST", "path": f"/v1/keys/{KEY_ID}/revoke", "role": "admin"},
    {
        "name": "45_review_queue",
        "method": "GET",
        "path": "/v1/payments?decision=challenge&unlabelled=true",
        "role": "analyst",
    },
    {"name": "46_list_payments", "method": "GET", "path": "/v1/payments?limit=2", "role": "analyst"},
    {"name": "47_list_reviews", "method": "GET", "path": "/v1/reviews?decision=publish", "role": "analyst"},
    {"name": "48_list_accounts", "method": "GET", "path": "/v1/accounts", "role": "analyst"},
    {"name": "49_list_jobs", "method": "GET", "path": "/v1/jobs", "role": "analyst"},
    {
        "name": "50_evaluate_version_on_a_payment",
        "method": "GET",
        "path": "/v1/policies/payment/versions/2/evaluate/pay_0002",
        "role": "analyst",
    },
    {
        "name": "51_record_labels_batch",
        "method": "POST",
        "path": "/v1/labels/batch",
        "role": "scorer",
        "body": {
            "labels": [
                {"label_id": "lbl_0101", "payment_id": "pay_0001", "label": "legitimate", "occurred_at": T_LABEL},
                {"label_id": "lbl_0102", "payment_id": "pay_0003", "label": "chargeback", "occurred_at": T_LABEL},
            ]
        },
    },
    {
        "name": "52_erase_pii",
        "method": "POST",
        "path": "/v1/pii/erase",
        "role": "admin",
        "body": {"kind": "email", "value": "li.wei@example.com"},
    },
]


def send(client: Any, req: dict[str, Any], headers: dict[str, str], state: dict[str, str]) -> Any:
    """Send one example request (substituting the last job or key id; polling a job until it has finished)."""
    path = req["path"].replace(JOB_ID, state.get("job_id", "none")).replace(KEY_ID, state.get("key_id", "none"))
    response = client.request(req["method"], path, json=req.get("body"), headers=headers)
    while req.get("poll") and response.status_code == 200 and response.json().get("state") == "running":
        time.sleep(0.02)
        response = client.request(req["method"], path, headers=headers)
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict) and str(body.get("id", "")).startswith("backtest_"):
            state["job_id"] = body["id"]
        if isinstance(body, dict) and str(body.get("key", "")).startswith("rk_"):
            state["key_id"] = body["key_id"]
    return response


def response_body(response: Any) -> Any:
    """JSON answers as data, plain-text ones (diffs) as text."""
    if response.headers.get("content-type", "").startswith("text/plain"):
        return response.text
    return response.json()


def strip(value: Any) -> Any:
    """The answer without fields that change from run to run."""
    if isinstance(value, dict):
        return {
            k: strip(v)
            for k, v in value.items()
            if k not in VOLATILE and not (k == "id" and str(v).startswith(VOLATILE_PREFIXES))
        }
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def example_path(name: str) -> Path:
    return EXAMPLES / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(example_path(name).read_text())
    return data
