"""Stored feature vectors: an attribute a detector reads unchanged is stored once, in the record, and reads back
exactly as the detector computed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from risk_engine.detectors import StreamingDetector
from risk_engine.detectors.spec import SpecError, parse_spec_file
from risk_engine.detectors.vectors import ELIDED, VectorPacker, stored_vector, stored_vectors
from risk_engine.dsl import compile_features
from risk_engine.engine import SUBJECT_KINDS, load_environments
from risk_engine.payments import PaymentIn
from risk_engine.storage import models as m
from risk_engine.vault import Vault
from tests.conftest import Api, make_settings, payment

SPEC = """
[detectors.mixed]
subject = "payment"
estimator = "GaussianZScore"
[detectors.mixed.features]
amount = "log1p(amount.major)"
V1 = "attributes.V1"
renamed = "attributes.V3"
V2 = "attributes.V2"
V4 = "attributes.V4 * 2"
risk_signal = "attributes.risk_signal"
promo_code_used = "attributes.promo_code_used"

[detectors.twin]
subject = "payment"
estimator = "GaussianZScore"
[detectors.twin.features]
V1 = "attributes.V1"
V2 = "attributes.V2"
risk_signal = "attributes.risk_signal"
promo_code_used = "attributes.promo_code_used"
doubled = "attributes.V1 * 2"

[detectors.derived]
subject = "payment"
estimator = "GaussianZScore"
[detectors.derived.features]
amount = "log1p(amount.major)"
items = "item_count"
"""


def detectors(tmp_path: Path) -> list[StreamingDetector]:
    envs, _, _ = load_environments(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}"))
    path = tmp_path / "d.toml"
    path.write_text(SPEC)
    return [StreamingDetector(spec, compile_features(spec.features, envs["payment"])) for spec in parse_spec_file(path)]


def record_of(body: dict[str, Any]) -> dict[str, Any]:
    vault = Vault(b"m" * 32, b"b" * 32)
    record, _ = SUBJECT_KINDS["payment"].flatten(PaymentIn.model_validate(body), vault)
    return record


@pytest.mark.parametrize(
    "attributes",
    [
        {"V1": 1.5, "V2": -2.25, "V3": 0.1, "V4": 3, "risk_signal": 7, "promo_code_used": True},
        {"V1": -0.000123456789012345, "V3": 5, "V4": 1.25},  # V2, risk_signal, promo_code_used absent
        {},
    ],
)
def test_a_stored_vector_reads_back_exactly_as_the_detector_computed_it(
    tmp_path: Path, attributes: dict[str, Any]
) -> None:
    mixed, twin, derived = detectors(tmp_path)
    assert mixed.features.attribute_names == twin.features.attribute_names
    assert mixed.features.attribute_names == ("V1", "V2", "risk_signal", "promo_code_used")
    assert derived.features.attribute_names == ()
    record = record_of(payment(attributes=attributes))
    vectors = {d.name: d.features.compute(record, {}, {}, {}) for d in (mixed, twin, derived)}
    # stored and read back as the database does: JSON both ways
    column = orjson.loads(orjson.dumps(VectorPacker([mixed, twin, derived]).pack(vectors)))
    stored_record = orjson.loads(orjson.dumps(record))
    kept = column["mixed"]
    assert not set(kept) & {"V1", "V2", "risk_signal", "promo_code_used"}  # the record holds them
    assert "amount" in kept and all(
        (name in kept) == (attr in attributes) for name, attr in [("V4", "V4"), ("renamed", "V3")]
    )
    # the twin elides the same names: it names the detector that lists them
    assert column[ELIDED] == {"mixed": ["V1", "V2", "risk_signal", "promo_code_used"], "twin": "mixed"}
    assert column["derived"] == vectors["derived"]
    for d in (mixed, twin, derived):
        back = stored_vector(column, d.name, stored_record, d.features.names)
        assert back == vectors[d.name]
        assert list(back or {}) == list(vectors[d.name])  # the order a supervised model's columns follow
    orders = {d.name: d.features.names for d in (mixed, twin, derived)}
    assert stored_vectors(column, stored_record, orders) == vectors


def test_rows_stored_with_whole_vectors_read_as_they_were(tmp_path: Path) -> None:
    mixed, _, _ = detectors(tmp_path)
    whole = {"amount": 2.5, "V1": 1.0, "renamed": 4.0, "V2": 9.0}
    column = {"mixed": whole}  # no ELIDED: the record is not read
    assert stored_vector(column, "mixed", {"attributes.V1": -7.0}, mixed.features.names) == whole
    assert stored_vector(column, "other", {}, ()) is None
    assert stored_vector(None, "mixed", {}, ()) is None


def test_no_detector_may_take_the_name_the_stored_vectors_reserve(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(SPEC.replace("detectors.derived", f'detectors."{ELIDED}"'))
    with pytest.raises(SpecError, match="cannot start with '@'"):
        parse_spec_file(path)


def test_an_event_stores_its_attribute_features_once_and_shows_them_whole(api: Api) -> None:
    attributes = {f"V{i}": i / 7 - 2 for i in range(1, 29)}
    api.score(payment(payment_id="pay_vec", attributes=attributes))
    api.engine.writer.barrier().wait(10)
    with api.engine.db.connect() as conn:
        column, record = conn.execute(
            select(m.Event.features, m.Event.record).where(m.Event.event_id == "pay_vec")
        ).one()
    shown = api.client.get("/v1/payments/pay_vec", headers=api.headers("analyst")).json()["features"]
    for det in api.engine.subjects["payment"].detectors:
        assert not set(column[det.name]) & set(attributes)  # stored once, in the record
        assert det.features.attribute_names and set(det.features.attribute_names) <= set(attributes)
        assert shown[det.name] == det.features.compute(record, {}, {}, {})  # every feature, as scored
        assert shown[det.name]["V14"] == attributes["V14"]
