"""The service answers as its OpenAPI document says: schemathesis generates requests for every operation from
the document (valid and not) and checks each answer against it: no 5xx, a documented status and media type,
a body of the documented schema, and a request the document rules out refused. Seeded, so a run is repeatable.

This is how session 18 found numbers taken as Unix times, and 404s and 409s the document did not name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from risk_engine.engine import RiskEngine
from risk_engine.service import create_app
from tests.conftest import make_settings

_HOME = Path(tempfile.mkdtemp(prefix="risk-engine-conformance-"))
_SETTINGS = make_settings(_HOME / "var", f"sqlite:///{_HOME / 'risk.db'}")
_engine = RiskEngine.open(_SETTINGS)
_KEY, _ = _engine.create_api_key("admin", "conformance")  # before the app's lifespan, so known at import
_engine.close()
AUTH = {"Authorization": f"Bearer {_KEY}"}
# a body past the size limit is refused with a 413 before it is read: a rejection too
_CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 409, 413, 415, 422]}}}
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", create_app(_SETTINGS), config=_CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()  # schemathesis started the app's lifespan (the engine) at its first request


@SCHEMA.exclude(path_regex="revoke").parametrize()  # revoking keys would revoke the one these requests use
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers=AUTH,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
