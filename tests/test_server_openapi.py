"""/openapi.json describes the routes mrs serves, and schemathesis, fuzzing every operation
it describes within a bounded number of cases, gets no 5xx and leaves the server serving."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from server_fixtures import API_KEY, LLAMA

schemathesis = pytest.importorskip("schemathesis")

pytest_plugins = ["server_fixtures"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Covered by their own tests, and not for a fuzzer: they delete, copy or download models.
DESTRUCTIVE = {("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/pull")}
CASES = 6


def test_the_document_lists_every_route_the_server_answers(live_server):
    doc = httpx.get(live_server.url + "/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "mrs"
    served = {"/", "/health", "/metrics", "/openapi.json", "/api/generate", "/api/chat", "/api/embed",
              "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/delete", "/api/copy", "/api/pull",
              "/api/version", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
              "/v1/models/{model_id}", "/v1/generate", "/v1/generate_stream", "/v1/generate_batch"}
    assert set(doc["paths"]) == served
    schemathesis.openapi.from_dict(doc).validate()      # a valid OpenAPI 3.0 document


def test_fuzzing_every_operation_gets_no_server_error(live_server):
    doc = httpx.get(live_server.url + "/openapi.json", headers=AUTH).json()
    schema = schemathesis.openapi.from_dict(doc)
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in DESTRUCTIVE:
            continue

        @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=live_server.url, headers=AUTH, timeout=120)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert isinstance(response.json(), dict)      # an error is JSON, in the route's dialect

        check()
        checked += 1
    assert checked == len(doc["paths"]) - len(DESTRUCTIVE)
    with live_server.client() as c:                           # and it still serves
        assert c.post("/v1/generate", json={"model": LLAMA, "prompt": "Hi", "max_tokens": 2}).status_code == 200
