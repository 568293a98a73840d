"""The OpenAPI document describes every answer: schemathesis generates requests from /openapi.json (valid and
invalid query values, arbitrary multipart bodies) and checks that no answer is a 5xx and that every answer's
status and body match the document, validation errors included.

(schemathesis' own pytest loader from a fixture does not run under pytest 9, so the operations' strategies are
driven with hypothesis here.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from serve.main import create_app
from test_serve import settings_for, weights  # noqa: F401  (module fixture)

CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(weights):  # noqa: F811
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_for(weights)))


def operations():
    return ["GET /health", "GET /info", "POST /segment", "POST /segment/mask", "POST /segment/overlay",
            "POST /segment/seg", "POST /segment/nifti", "POST /segment/probabilities"]


@pytest.mark.parametrize("label", operations())
def test_every_answer_matches_the_openapi_document(api_schema, label):
    method, path = label.split()
    operation = api_schema[path][method]

    modes = [operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]

    @given(case=st.one_of(modes))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(checks=CHECKS)

    check()


def test_the_document_lists_exactly_these_operations(api_schema):
    found = sorted(f"{result.ok().method.upper()} {result.ok().path}" for result in api_schema.get_all_operations())
    assert found == sorted(operations())
