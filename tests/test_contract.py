"""The HTTP contract in the repo: api/openapi.json matches the code, and every example still holds."""

from __future__ import annotations

import json
from pathlib import Path

from risk_engine.config import Settings
from risk_engine.service import create_app
from tests.api_examples import REQUESTS, load, response_body, send, strip
from tests.conftest import REPO, make_settings, open_api


def test_openapi_document_matches_the_code() -> None:
    generated = create_app(Settings()).openapi()
    stored = json.loads((REPO / "api" / "openapi.json").read_text())
    assert stored == json.loads(json.dumps(generated)), "api/openapi.json is stale: run `make openapi`"


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
