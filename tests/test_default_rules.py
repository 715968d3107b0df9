"""Every default rule in rules/payment.rules, firing and not firing, through the HTTP API.

Each scenario owns its identities (buyer, card, device, IP, e-mail, address, seller), so scenarios share
one service per backend without touching each other's velocity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from risk_engine.dsl import compile_policy
from risk_engine.engine import load_environments
from tests.conftest import REPO, Api, make_settings, open_api, payment, postgres_url_or_skip

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class Scenario:
    """Payments whose identities are unique to one scenario."""

    def __init__(self, api: Api, name: str) -> None:
        self.api = api
        self.ns = name
        self.n = 0
        h = hashlib.sha256(name.encode()).digest()
        self.ip = f"10.{h[0]}.{h[1]}.{h[2]}"

    def body(self, at: datetime = T0, **overrides: Any) -> dict[str, Any]:
        self.n += 1
        ns = self.ns
        fields: dict[str, Any] = {
            "payment_id": f"{ns}_{self.n}",
            "occurred_at": iso(at),
            "seller_id": f"s_{ns}",
            "order_id": f"o_{ns}_{self.n}",
            "amount.value": 50_000,
            "buyer.id": f"b_{ns}",
            "buyer.email": f"{ns}@example.com",
            "buyer.phone": "+86138" + str(int(hashlib.md5(ns.encode()).hexdigest(), 16))[:8],
            "buyer.verified": True,
            "buyer.created_at": "2024-01-01T00:00:00Z",
            "payment_method.card_fingerprint": f"fp_{ns}",
            "device.id": f"dev_{ns}",
            "device.ip": self.ip,
            "shipping_address.line1": f"{self.n} {ns} Road",
        }
        fields.update(overrides)
        return payment(**fields)

    def pay(self, at: datetime = T0, **overrides: Any) -> dict[str, Any]:
        return self.api.score(self.body(at, **overrides))

    def add_to_list(self, name: str, value: str) -> None:
        r = self.api.client.post(
            f"/v1/lists/{name}/entries", json={"value": value}, headers=self.api.headers("analyst")
        )
        assert r.status_code == 201, r.text


Run = Callable[[Scenario, bool], dict[str, Any]]


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def s_blocked_device(s: Scenario, fire: bool) -> dict[str, Any]:
    s.add_to_list("blocked_devices", f"dev_{s.ns}" if fire else "dev_someone_else")
    return s.pay()


def s_blocked_email(s: Scenario, fire: bool) -> dict[str, Any]:
    s.add_to_list("blocked_emails", f"{s.ns.upper()}@Example.com " if fire else "other@example.com")
    return s.pay()


def s_blocked_card(s: Scenario, fire: bool) -> dict[str, Any]:
    s.add_to_list("blocked_cards", f"fp_{s.ns}" if fire else "fp_other")
    return s.pay()


def s_blocked_ip(s: Scenario, fire: bool) -> dict[str, Any]:
    s.add_to_list("blocked_ips", s.ip if fire else "198.51.100.1")
    return s.pay()


def s_blocked_ip_range(s: Scenario, fire: bool) -> dict[str, Any]:
    network = s.ip.rsplit(".", 1)[0] + ".0/24"  # this scenario's own network only
    s.add_to_list("blocked_ip_ranges", network if fire else "192.0.2.0/24")
    return s.pay()


def s_blocked_phone(s: Scenario, fire: bool) -> dict[str, Any]:
    body = s.body()
    s.add_to_list("blocked_phones", body["buyer"]["phone"] if fire else "+15550000000")
    return s.api.score(body)


def s_fraud_address(s: Scenario, fire: bool) -> dict[str, Any]:
    body = s.body(**{"shipping_address.line1": "88 Fraud Lane" if fire else "89 Honest Lane"})
    # the list entry is the full address (line1, line2, city, postal code, country), matched case-insensitively
    s.add_to_list("fraud_addresses", "88 fraud lane  hangzhou 310000 CN")
    return s.api.score(body)


def s_vip_buyer(s: Scenario, fire: bool) -> dict[str, Any]:
    s.add_to_list("vip_buyers", f"b_{s.ns}")
    result = s.pay(billing_country="US", **{"buyer.verified": fire})
    if fire:
        assert result["decision"] == "allow"
    return result


def s_trusted_history(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(5 if fire else 4):
        s.pay(T0 - timedelta(days=10 * (i + 1)))
    return s.pay()


def s_card_testing(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(4):
        s.pay(T0 - minutes(8 - i), **{"amount.value": 500})
    return s.pay(**{"amount.value": 900 if fire else 5_000})


def s_card_velocity_burst(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(10 if fire else 9):
        s.pay(T0 - minutes(50 - 5 * i), **{"buyer.id": f"b_{s.ns}_{i % 2}"})
    return s.pay()


def s_card_many_buyers(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(2 if fire else 1):
        s.pay(T0 - timedelta(hours=i + 1), **{"buyer.id": f"other_{s.ns}_{i}"})
    return s.pay()


def s_buyer_many_cards(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(2 if fire else 1):
        s.pay(T0 - timedelta(hours=i + 1), **{"payment_method.card_fingerprint": f"fp_{s.ns}_{i}"})
    return s.pay()


def s_buyer_velocity_burst(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(4):
        at = T0 - minutes(8 - i) if fire else T0 - minutes(40 - 8 * i)
        s.pay(at, **{"payment_method.card_fingerprint": f"fp_{s.ns}_{i}"})
    return s.pay()


def s_buyer_spend_spike(s: Scenario, fire: bool) -> dict[str, Any]:
    s.pay(T0 - timedelta(hours=3), **{"amount.value": (19_000 if fire else 15_000) * 100})
    return s.pay(**{"amount.value": 2_000 * 100})


def s_seller_payment_burst(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(50 if fire else 49):
        s.pay(
            T0 - minutes(9) + timedelta(seconds=i),
            **{
                "buyer.id": f"b_{s.ns}_{i}",
                "payment_method.card_fingerprint": f"fp_{s.ns}_{i}",
                "device.id": f"dev_{s.ns}_{i}",
                "device.ip": f"172.16.{i}.{len(s.ns)}",
            },
        )
    return s.pay()


def s_device_many_buyers(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(3 if fire else 2):
        s.pay(
            T0 - timedelta(hours=i + 1),
            **{"buyer.id": f"o_{s.ns}_{i}", "payment_method.card_fingerprint": f"fp_{s.ns}"},
        )
    return s.pay()


def s_device_many_cards(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(3 if fire else 2):
        s.pay(T0 - timedelta(hours=i + 1), **{"payment_method.card_fingerprint": f"fp_{s.ns}_{i}"})
    return s.pay(**{"payment_method.card_fingerprint": f"fp_{s.ns}_{i}"})


def s_ip_many_buyers(s: Scenario, fire: bool) -> dict[str, Any]:
    for i in range(4 if fire else 3):
        s.pay(
            T0 - minutes(10 * (i + 1)),
            **{
                "buyer.id": f"o_{s.ns}_{i}",
                "device.id": f"d_{s.ns}_{i}",
                "payment_method.card_fingerprint": f"fp_{s.ns}_{i}",
            },
        )
    return s.pay()


def s_address_many_buyers(s: Scenario, fire: bool) -> dict[str, Any]:
    same = {"shipping_address.line1": f"1 {s.ns} Depot"}
    for i in range(4 if fire else 3):
        s.pay(
            T0 - timedelta(days=i + 1),
            **same,
            **{
                "buyer.id": f"o_{s.ns}_{i}",
                "device.id": f"d_{s.ns}_{i}",
                "payment_method.card_fingerprint": f"fp_{s.ns}_{i}",
            },
        )
    return s.pay(**same)


def s_new_account_large_ticket(s: Scenario, fire: bool) -> dict[str, Any]:
    created = T0 - (timedelta(hours=2) if fire else timedelta(days=2))
    return s.pay(**{"buyer.created_at": iso(created), "amount.value": 3_000 * 100})


def s_young_account_medium_ticket(s: Scenario, fire: bool) -> dict[str, Any]:
    created = T0 - (timedelta(days=3) if fire else timedelta(days=10))
    return s.pay(**{"buyer.created_at": iso(created), "amount.value": 1_000 * 100})


def s_unverified_large_ticket(s: Scenario, fire: bool) -> dict[str, Any]:
    return s.pay(**{"buyer.verified": not fire, "amount.value": 5_000 * 100})


def s_bulk_order_new_account(s: Scenario, fire: bool) -> dict[str, Any]:
    created = iso(T0 - timedelta(days=10))
    return s.pay(item_count=20 if fire else 19, **{"buyer.created_at": created})


def s_night_high_value(s: Scenario, fire: bool) -> dict[str, Any]:
    at = T0.replace(hour=3) if fire else T0
    return s.pay(at, **{"amount.value": 2_000 * 100})


def s_billing_shipping_mismatch(s: Scenario, fire: bool) -> dict[str, Any]:
    return s.pay(billing_country="US" if fire else "CN")


def s_issuer_shipping_mismatch(s: Scenario, fire: bool) -> dict[str, Any]:
    return s.pay(**{"payment_method.issuer_country": "US", "payment_method.type": "card" if fire else "wallet"})


def s_disposable_email(s: Scenario, fire: bool) -> dict[str, Any]:
    domain = "mailinator.com" if fire else "example.com"
    return s.pay(**{"buyer.email": f"{s.ns}@{domain}"})


def s_no_contact_details(s: Scenario, fire: bool) -> dict[str, Any]:
    from tests.conftest import DELETE

    return s.pay(**{"buyer.email": DELETE, "buyer.phone": DELETE if fire else "+8613900000000"})


def s_api_channel_unverified(s: Scenario, fire: bool) -> dict[str, Any]:
    return s.pay(channel="api", **{"buyer.verified": not fire})


def s_anomaly_extreme_large(s: Scenario, fire: bool) -> dict[str, Any]:
    # warm the detector on ordinary traffic, then send one payment unlike anything before it
    for i in range(120):
        s.pay(
            T0 - minutes(300 - 2 * i),
            **{
                "buyer.id": f"w_{s.ns}_{i % 40}",
                "amount.value": 20_000 + 37 * i,
                "payment_method.card_fingerprint": f"fp_{s.ns}_{i % 40}",
                "device.id": f"d_{s.ns}_{i % 40}",
                "device.ip": f"172.20.{i % 40}.1",
                "shipping_address.line1": f"{i % 40} Quiet St",
                "attributes": {f"V{k}": 0.01 * ((i * k) % 7) for k in range(1, 29)},
            },
        )
    if fire:
        extreme = {f"V{k}": 40.0 for k in range(1, 29)}
        return s.pay(item_count=900, attributes=extreme, **{"amount.value": 90_000_00})
    return s.pay(attributes={f"V{k}": 0.02 for k in range(1, 29)}, **{"amount.value": 20_500})


SCENARIOS: dict[str, tuple[str, Run]] = {
    "blocked_device": ("BLOCKED_DEVICE", s_blocked_device),
    "blocked_email": ("BLOCKED_EMAIL", s_blocked_email),
    "blocked_card": ("BLOCKED_CARD", s_blocked_card),
    "blocked_ip": ("BLOCKED_IP", s_blocked_ip),
    "blocked_ip_range": ("BLOCKED_IP_RANGE", s_blocked_ip_range),
    "blocked_phone": ("BLOCKED_PHONE", s_blocked_phone),
    "fraud_address": ("FRAUD_ADDRESS", s_fraud_address),
    "vip_buyer": ("VIP_BUYER", s_vip_buyer),
    "trusted_history": ("TRUSTED_HISTORY", s_trusted_history),
    "card_testing": ("CARD_TESTING", s_card_testing),
    "card_velocity_burst": ("CARD_VELOCITY", s_card_velocity_burst),
    "card_many_buyers": ("CARD_SHARED_BY_BUYERS", s_card_many_buyers),
    "buyer_many_cards": ("BUYER_MANY_CARDS", s_buyer_many_cards),
    "buyer_velocity_burst": ("BUYER_VELOCITY", s_buyer_velocity_burst),
    "buyer_spend_spike": ("BUYER_SPEND_SPIKE", s_buyer_spend_spike),
    "seller_payment_burst": ("SELLER_BURST", s_seller_payment_burst),
    "device_many_buyers": ("DEVICE_SHARED", s_device_many_buyers),
    "device_many_cards": ("DEVICE_MANY_CARDS", s_device_many_cards),
    "ip_many_buyers": ("IP_SHARED", s_ip_many_buyers),
    "address_many_buyers": ("ADDRESS_SHARED", s_address_many_buyers),
    "new_account_large_ticket": ("NEW_ACCOUNT_LARGE_TICKET", s_new_account_large_ticket),
    "young_account_medium_ticket": ("YOUNG_ACCOUNT_TICKET", s_young_account_medium_ticket),
    "unverified_large_ticket": ("UNVERIFIED_LARGE_TICKET", s_unverified_large_ticket),
    "bulk_order_new_account": ("BULK_ORDER_NEW_ACCOUNT", s_bulk_order_new_account),
    "night_high_value": ("NIGHT_HIGH_VALUE", s_night_high_value),
    "billing_shipping_mismatch": ("GEO_BILLING_MISMATCH", s_billing_shipping_mismatch),
    "issuer_shipping_mismatch": ("GEO_ISSUER_MISMATCH", s_issuer_shipping_mismatch),
    "disposable_email": ("DISPOSABLE_EMAIL", s_disposable_email),
    "no_contact_details": ("NO_CONTACT", s_no_contact_details),
    "api_channel_unverified": ("API_UNVERIFIED", s_api_channel_unverified),
    "anomaly_extreme_large": ("ANOMALY_EXTREME", s_anomaly_extreme_large),
}


def test_every_default_rule_has_a_scenario() -> None:
    envs, _, _ = load_environments(make_settings(Path("/nonexistent"), "sqlite://"))
    policy = compile_policy((REPO / "rules" / "payment.rules").read_text(), envs)
    assert len(policy.rules) >= 25
    assert {r.name for r in policy.rules} == set(SCENARIOS)
    assert {r.name: r.code for r in policy.rules} == {name: code for name, (code, _) in SCENARIOS.items()}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def rules_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("rules")
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'risk.db'}"
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
    else:
        import uuid
        from urllib.parse import quote

        from sqlalchemy import create_engine, text

        base = postgres_url_or_skip()
        schema = "r_" + uuid.uuid4().hex[:12]
        admin = create_engine(base)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{base}?options={quote(f'-csearch_path={schema}')}"

        def cleanup() -> None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

    client, api = open_api(make_settings(home / "var", url))
    yield api
    client.__exit__(None, None, None)
    cleanup()


@pytest.mark.parametrize("fire", [True, False], ids=["fires", "does-not-fire"])
@pytest.mark.parametrize("rule", list(SCENARIOS))
def test_default_rule(rules_api: Api, rule: str, fire: bool) -> None:
    code, run = SCENARIOS[rule]
    result = run(Scenario(rules_api, f"{rule}_{'y' if fire else 'n'}"), fire)
    codes = [r["code"] for r in result["reasons"]]
    if fire:
        assert code in codes, (rule, result)
    else:
        assert code not in codes, (rule, result)


def test_amount_rules_read_the_base_currency_and_sum_across_currencies(api: Api) -> None:
    s = Scenario(api, "fx")
    young = {"buyer.created_at": iso(T0 - timedelta(hours=2))}

    def codes(**overrides: Any) -> list[str]:
        return [r["code"] for r in s.pay(**young, **overrides)["reasons"] if r["source"] == "rule"]

    # 1,000 USD is 7,100 CNY: a large ticket for a day-old account; 10,000 JPY (470 CNY) and a currency
    # without a rate are not
    assert "NEW_ACCOUNT_LARGE_TICKET" in codes(amount={"value": 100_000, "currency": "USD"})
    assert "NEW_ACCOUNT_LARGE_TICKET" not in codes(amount={"value": 10_000, "currency": "JPY"})
    assert "NEW_ACCOUNT_LARGE_TICKET" not in codes(amount={"value": 10_000_000, "currency": "BRL"})
    # the buyer's day so far, in CNY: 7,100 + 470 (the BRL payment has none) + 3,850 for 500 EUR; then 1,000 GBP
    # (9,000) takes it past 20,000
    assert "BUYER_SPEND_SPIKE" not in codes(amount={"value": 50_000, "currency": "EUR"})
    assert "BUYER_SPEND_SPIKE" in codes(amount={"value": 100_000, "currency": "GBP"})
    stored = api.client.get(f"/v1/payments/fx_{s.n}", headers=api.headers()).json()
    assert stored["aggregates"]["sum(amount.base by buyer.id within 1d)"] == pytest.approx(7_100 + 470 + 3_850)
