"""Property-based tests of the HTTP service against its own OpenAPI schema (schemathesis): whatever a client
sends, the answer is never a server error and conforms to the schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from dgmrec.serving.app import create_app  # noqa: E402
from dgmrec.serving.state import ServingState  # noqa: E402
from test_serving import trained  # noqa: E402, F401  (the module-scoped run)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_state(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingState]:  # noqa: F811
    run = tmp_path_factory.mktemp("schema") / "run"
    shutil.copytree(trained, run)
    state = ServingState(run)
    yield state
    state.close()


OPERATIONS = [("GET", "/users/{user}/recommendations"), ("GET", "/items/{item}/similar"), ("POST", "/items"),
              ("POST", "/feedback"), ("GET", "/health"), ("GET", "/metrics")]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_server_errors_and_answers_follow_the_schema(served_state: ServingState, method: str, path: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(served_state, max_body_bytes=64 * 1024))
    operation = schema[path][method]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance,
                                       negative_data_rejection])

    check()
