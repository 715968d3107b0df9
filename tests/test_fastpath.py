"""The scoring fast path answers exactly as the FastAPI routes do, and hands every other request to them."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from risk_engine.storage import models as m
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


def _stored(api: Api) -> int:
    with api.engine.db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.Event)).scalar_one())


def _latency_count(api: Api, route: str, status: int) -> float:
    """How many requests the latency histogram counted for ``route`` answered with ``status``."""
    text = api.client.get("/metrics").text
    pattern = rf'risk_engine_request_seconds_count{{method="POST",route="{re.escape(route)}",status="{status}"}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_a_body_past_the_limit_is_refused_unread_though_no_length_was_declared(tmp_path: Path) -> None:
    # the fast path stands in front of the request guard: it must not read, let alone score, a body the guard
    # would refuse; sent in chunks, nothing declares its length up front
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", max_body_bytes=1000)
    client, api = open_api(settings)
    try:
        long_agent = payment(payment_id="pay_long", **{"device.user_agent": "M" * 500})
        body = json.dumps(long_agent).encode()
        short = json.dumps(payment(payment_id="pay_short")).encode()
        assert len(short) < 1000 < len(body)
        headers = {**api.headers(), "Content-Type": "application/json"}
        refused = api.client.post("/v1/payments/score", content=iter([body]), headers=headers)
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"] == "too_large"
        assert _stored(api) == 0
        layer = api.client.app.state.scoring_fast_path  # type: ignore[attr-defined]
        assert (layer.answered, layer.handed_over) == (0, 1)
        # the same way, under the limit: scored here
        scored = api.client.post("/v1/payments/score", content=iter([short]), headers=headers)
        assert scored.status_code == 200, scored.text
        assert (layer.answered, layer.handed_over) == (1, 1)
        assert _stored(api) == 1
    finally:
        client.__exit__(None, None, None)


def test_the_request_metrics_count_each_scoring_request_once_whoever_answers_it(both: tuple[Api, Api]) -> None:
    fast, _ = both
    route = "/v1/payments/score"
    assert fast.client.post(route, json=payment(), headers=fast.headers()).status_code == 200
    invalid = payment(payment_id="p2", amount={"value": -1, "currency": "CNY"})
    assert fast.client.post(route, json=invalid, headers=fast.headers()).status_code == 422
    assert (_latency_count(fast, route, 200), _latency_count(fast, route, 422)) == (1.0, 1.0)
    layer = fast.client.app.state.scoring_fast_path  # type: ignore[attr-defined]
    assert (layer.answered, layer.handed_over) == (1, 1)


def test_an_unexpected_error_while_scoring_is_a_500_counted_in_the_metrics(
    both: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = both

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fast.engine, "score_event", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # raised on, for the server to log
        fast.client.post("/v1/payments/score", json=payment(), headers=fast.headers())
    quiet = TestClient(fast.client.app, raise_server_exceptions=False)
    answered = quiet.post("/v1/payments/score", json=payment(), headers=fast.headers())
    assert (answered.status_code, answered.text) == (500, "Internal Server Error")
    assert _latency_count(fast, "/v1/payments/score", 500) == 2.0
    assert _stored(fast) == 0


def test_requests_that_arrive_together_are_scored_in_one_burst_each_answered_as_if_alone(
    both: tuple[Api, Api],
) -> None:
    fast, routes = both
    # one card for all: each payment's velocity counts the ones before it, so the order of scoring shows
    sent = [payment(payment_id=f"pay_b{i}", **{"payment_method.card_fingerprint": "fp_burst"}) for i in range(12)]
    sent.append(payment(payment_id="pay_b0", amount={"value": 5, "currency": "CNY"}))  # the first id again: 409

    async def all_at_once(app: Any) -> list[tuple[int, Any]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://risk") as client:
            answers = await asyncio.gather(
                *(client.post("/v1/payments/score", json=body, headers=fast.headers()) for body in sent)
            )
        return [(a.status_code, a.json()) for a in answers]

    together = fast.client.portal.call(all_at_once, fast.client.app)  # type: ignore[union-attr]
    one_by_one = []
    for body in sent:
        r = routes.client.post("/v1/payments/score", json=body, headers=routes.headers())
        one_by_one.append((r.status_code, r.json()))
    for answers in (together, one_by_one):
        for _, body in answers:
            body.pop("elapsed_ms", None)
    assert [status for status, _ in together] == [200] * 12 + [409]
    assert together == one_by_one
    last_codes = [r["code"] for r in together[11][1]["reasons"]]
    assert any("CARD" in code for code in last_codes)  # the velocity rules saw the burst's earlier payments
    bursts = fast.client.app.state.scoring_bursts  # type: ignore[attr-defined]
    assert bursts.largest > 1 and bursts.items == 13
    scraped = fast.client.get("/metrics").text
    assert "risk_engine_scoring_burst_requests_total 13.0" in scraped
    assert f"risk_engine_scoring_bursts_total {float(bursts.bursts)}" in scraped


def test_an_error_in_one_request_of_a_burst_leaves_the_others_answered(
    both: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = both
    engine = fast.engine
    score_event = engine.score_event

    def failing_for_one(subject: str, event: Any, request_hash: str | None = None) -> Any:
        if event.payment_id == "pay_bad":
            raise RuntimeError("a bug")
        return score_event(subject, event, request_hash)

    monkeypatch.setattr(engine, "score_event", failing_for_one)
    sent = [payment(payment_id=p) for p in ("pay_x1", "pay_bad", "pay_x2")]

    async def all_at_once(app: Any) -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://risk") as client:
            answers = await asyncio.wait_for(  # a request left unanswered would wait for ever: fail instead
                asyncio.gather(
                    *(client.post("/v1/payments/score", json=body, headers=fast.headers()) for body in sent)
                ),
                timeout=60,
            )
        return [a.status_code for a in answers]

    assert fast.client.portal.call(all_at_once, fast.client.app) == [200, 500, 200]  # type: ignore[union-attr]
    bursts = fast.client.app.state.scoring_bursts  # type: ignore[attr-defined]
    assert bursts.largest == 3
    assert [fast.engine.get_payment(p)["payment_id"] for p in ("pay_x1", "pay_x2")] == ["pay_x1", "pay_x2"]


def test_an_error_once_the_answer_has_begun_is_raised_on_without_a_second_answer(
    both: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = both
    from risk_engine.service import fastpath

    async def cut_off(send: Any, status: int, headers: Any, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        raise RuntimeError("cut off")

    monkeypatch.setattr(fastpath, "send_raw", cut_off)
    # a second start would be refused by the test client ('multiple http.response.start'), hiding this error
    with pytest.raises(RuntimeError, match="cut off"):
        fast.client.post("/v1/payments/score", json=payment(), headers=fast.headers())
    assert _latency_count(fast, "/v1/payments/score", 500) == 1.0
