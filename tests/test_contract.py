"""The HTTP contract in the repo: api/openapi.json matches the code, and every example still holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from risk_engine.config import Settings
from risk_engine.service import create_app
from tests.api_examples import REQUESTS, load, response_body, send, strip
from tests.conftest import REPO, Api, make_settings, open_api, payment


def test_openapi_document_matches_the_code() -> None:
    generated = create_app(Settings()).openapi()
    stored = json.loads((REPO / "api" / "openapi.json").read_text())
    assert stored == json.loads(json.dumps(generated)), "api/openapi.json is stale: run `make openapi`"


def test_the_document_lists_each_subjects_declared_attributes_and_no_others(tmp_path: Path) -> None:
    subjects = tmp_path / "subjects.toml"
    subjects.write_text('[review.attributes]\nchannel = "string"\nverified_purchase = "bool"\nbasket = "number"\n')
    settings = Settings(home=tmp_path, rules_dir=REPO / "rules", subjects_file=subjects)
    schemas = create_app(settings).openapi()["components"]["schemas"]
    review = schemas["ReviewIn"]["properties"]["attributes"]
    assert review["properties"] == {
        "channel": {"type": "string", "description": "Never a full card number"},
        "verified_purchase": {"type": "boolean"},
        "basket": {"type": "number", "minimum": -1e15, "maximum": 1e15},
    }
    assert review["additionalProperties"] is False
    payment_attributes = schemas["PaymentIn"]["properties"]["attributes"]  # none declared for payments here
    assert payment_attributes["properties"] == {} and payment_attributes["additionalProperties"] is False
    stored = json.loads((REPO / "api" / "openapi.json").read_text())["components"]["schemas"]
    assert {f"V{i}" for i in range(1, 29)} <= set(stored["PaymentIn"]["properties"]["attributes"]["properties"])


def test_every_endpoint_has_an_example() -> None:
    paths = json.loads((REPO / "api" / "openapi.json").read_text())["paths"]
    covered = {req["path"] for req in REQUESTS}
    for path in paths:
        if path in ("/metrics",):
            continue
        template = (
            path.replace("{payment_id}", "pay_0001")
            .replace("{list_name}", "blocked_devices")
            .replace("{subject}", "payment")
            .replace("{version}", "2")
            .replace("{account_id}", "acct_review_0001")
            .replace("{review_id}", "rev_0001")
            .replace("{seller_id}", "s_42")
            .replace("{name}", "account_population")
            .replace("{event_id}", "pay_0002")
        )
        assert any(c.split("?")[0] == template for c in covered), f"no example for {path}"


def test_examples_replay_exactly(tmp_path: Path) -> None:
    client, api = open_api(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}"))
    try:
        state: dict[str, str] = {}
        for req in REQUESTS:
            example = load(req["name"])
            assert example["request"].get("body") == req.get("body"), req["name"]
            headers = api.headers(req["role"]) if req["role"] else {}
            response = send(client, req, headers, state)
            assert response.status_code == example["response"]["status"], (req["name"], response.text)
            assert strip(response_body(response)) == strip(example["response"]["body"]), req["name"]
    finally:
        client.__exit__(None, None, None)


def _documented(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The documented answers of the operation whose template matches ``path``."""
    for template, operations in document["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if method.lower() in operations and re.match(pattern, path.split("?")[0]):
            answers: dict[str, Any] = operations[method.lower()]["responses"]
            return answers
    raise AssertionError(f"no operation {method} {path}")


def test_every_error_the_api_answers_is_documented_for_its_route(sqlite_api: Api) -> None:
    # found by fuzzing the API with schemathesis: 404s and 409s the document did not name, and a diff's 422
    # documented as text/plain
    api, document = sqlite_api, sqlite_api.client.app.openapi()  # type: ignore[attr-defined]
    api.score(payment())
    admin_id = next(
        k["key_id"] for k in api.client.get("/v1/keys", headers=api.headers("admin")).json() if k["role"] == "admin"
    )
    text = (REPO / "rules" / "payment.rules").read_text() + "\n# a draft\n"
    draft = api.client.post("/v1/policies/payment/drafts", json={"text": text}, headers=api.headers("analyst"))
    assert draft.status_code == 201, draft.text
    version = draft.json()["version"]
    keyed = {"Idempotency-Key": "k1"}
    cases: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("GET", "/v1/payments/nope", None, {}, 404),
        ("GET", "/v1/accounts/nope", None, {}, 404),
        ("GET", "/v1/reviews/nope", None, {}, 404),
        ("POST", "/v1/payments/score", payment(**{"amount.value": 1}), {}, 409),
        ("POST", "/v1/labels", {"label_id": "l1", "payment_id": "nope", "label": "chargeback"}, {}, 404),
        ("POST", "/v1/labels", {"label_id": "l2", "payment_id": "pay_0001", "label": "chargeback"}, {}, 201),
        ("POST", "/v1/labels", {"label_id": "l2", "payment_id": "pay_0001", "label": "legitimate"}, {}, 409),
        ("POST", "/v1/keys", {"role": "scorer", "name": "a", "request_id": "r1"}, {}, 201),
        ("POST", "/v1/keys", {"role": "analyst", "name": "a", "request_id": "r1"}, {}, 409),
        ("POST", "/v1/keys/999999/revoke", None, {}, 404),
        ("POST", f"/v1/keys/{admin_id}/revoke", None, {}, 409),
        ("GET", "/v1/lists/nope/entries", None, {}, 404),
        ("POST", "/v1/lists/nope/entries", {"value": "x"}, {}, 404),
        ("DELETE", "/v1/lists/blocked_devices/entries", {"value": "never-added"}, {}, 404),
        ("POST", "/v1/lists/blocked_devices/entries", {"value": "dev_9"}, keyed, 201),
        ("POST", "/v1/lists/blocked_devices/entries", {"value": "dev_8"}, keyed, 409),
        ("POST", "/v1/models/nope/fit", {}, {}, 404),
        ("GET", "/v1/merchants/s_nope/risk", None, {}, 404),
        ("GET", "/v1/sellers/s_nope/credit", None, {}, 404),
        ("GET", "/v1/policies/nope", None, {}, 404),
        ("GET", "/v1/policies/payment/versions/99", None, {}, 404),
        ("GET", "/v1/policies/payment/versions/1/evaluate/nope", None, {}, 404),
        ("GET", "/v1/policies/payment/diff?from=1&to=99", None, {}, 404),
        ("GET", "/v1/policies/payment/diff?from=1", None, {}, 422),
        ("POST", "/v1/policies/nope/drafts", {"text": text}, {}, 404),
        ("POST", "/v1/policies/payment/versions/99/publish", None, {}, 404),
        ("POST", "/v1/policies/payment/rollback", {"to_version": version}, {}, 409),
        ("POST", "/v1/policies/payment/versions/1/shadow", None, {}, 409),
        ("GET", "/v1/policies/payment/shadow", None, {}, 404),
        ("DELETE", "/v1/policies/payment/shadow", None, {}, 404),
        ("POST", "/v1/policies/payment/drafts/99/backtest", {"since": "30d"}, {}, 404),
        ("GET", "/v1/policies/nope/rules/stats", None, {}, 404),
        ("GET", "/v1/jobs/backtest_nope", None, {}, 404),
        ("DELETE", "/v1/jobs/backtest_nope", None, {}, 404),
    ]
    for method, path, body, extra, status in cases:
        response = api.client.request(method, path, json=body, headers={**api.headers("admin"), **extra})
        assert response.status_code == status, (method, path, response.text)
        answers = _documented(document, method, path)
        assert str(status) in answers, f"{method} {path} answers {status}, which its document does not name"
        if status >= 400:
            assert response.headers["content-type"].startswith("application/json")
            assert list(answers[str(status)]["content"]) == ["application/json"], (method, path, status)
