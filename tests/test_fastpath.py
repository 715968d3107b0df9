"""The scoring fast path answers exactly as the FastAPI routes do, and hands every other request to them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import BASE_REVIEW, Api, make_settings, open_api, payment


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[Api, Api]]:
    """Two services on their own SQLite files, alike but for the fast path."""
    clients: list[TestClient] = []
    apis = []
    for name, fast in (("fast", True), ("routes", False)):
        settings = make_settings(tmp_path / name, f"sqlite:///{tmp_path / name}.db", scoring_fast_path=fast)
        client, api = open_api(settings)
        clients.append(client)
        apis.append(api)
    yield apis[0], apis[1]
    for client in clients:
        client.__exit__(None, None, None)


def _exchange(api: Api, path: str, content: bytes | None = None, json: Any = None, **headers: str) -> tuple:
    sent = {"Authorization": f"Bearer {api.scorer_key}", "Content-Type": "application/json", **headers}
    sent = {k: v for k, v in sent.items() if v}
    r = api.client.post(path, content=content, json=json, headers=sent)
    body = r.json()
    if isinstance(body, dict):
        body.pop("elapsed_ms", None)
    return r.status_code, body, r.headers.get("idempotent-replayed")


REVIEW = BASE_REVIEW


def test_the_fast_path_answers_every_request_as_the_routes_do(both: tuple[Api, Api]) -> None:
    fast, routes = both
    other = payment(payment_id="pay_0001", amount={"value": 5, "currency": "CNY"})
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/payments/score", {"json": payment()}),
        ("/v1/payments/score", {"json": payment()}),  # a replay
        ("/v1/payments/score", {"json": other}),  # the same id, another request: 409
        ("/v1/payments/score", {"json": payment(payment_id="p2", card_number="4111111111111111")}),  # 422
        ("/v1/payments/score", {"content": b'{"payment_id": '}),  # malformed JSON: 422
        ("/v1/payments/score", {"json": payment(payment_id="p3", attributes={"undeclared": 1})}),  # 422
        ("/v1/payments/score", {"json": payment(payment_id="p4"), "Authorization": ""}),  # no key: 401
        ("/v1/payments/score", {"json": payment(payment_id="p5"), "Authorization": "Bearer rk_x_y"}),  # 401
        ("/v1/payments/score", {"json": payment(payment_id="p6", payment_method={"type": "wallet"})}),
        ("/v1/reviews/score", {"json": REVIEW}),
        ("/v1/reviews/score", {"json": {**REVIEW, "rating": 9}}),  # 422
    ]
    statuses = []
    for path, kwargs in requests:
        extra = {k: v for k, v in kwargs.items() if k not in ("json", "content")}
        a = _exchange(fast, path, kwargs.get("content"), kwargs.get("json"), **extra)
        b = _exchange(routes, path, kwargs.get("content"), kwargs.get("json"), **extra)
        assert a == b, path
        statuses.append(a[0])
    assert statuses == [200, 200, 409, 422, 422, 422, 401, 401, 200, 200, 422]
    layer = fast.client.app.state.scoring_fast_path  # type: ignore[attr-defined]
    # every answer but the errors came from the fast path; every error from the routes
    assert (layer.answered, layer.handed_over) == (4, 7)
    assert not hasattr(routes.client.app.state, "scoring_fast_path")  # type: ignore[attr-defined]


def test_a_key_of_a_higher_role_scores_through_the_fast_path(both: tuple[Api, Api]) -> None:
    fast, _ = both
    r = fast.client.post("/v1/payments/score", json=payment(), headers=fast.headers("analyst"))
    assert r.status_code == 200 and r.json()["payment_id"] == "pay_0001"
    assert fast.client.app.state.scoring_fast_path.answered == 1  # type: ignore[attr-defined]
