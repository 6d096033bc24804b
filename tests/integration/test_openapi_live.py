"""Schemathesis against the live gateway (real Triton, real HTTP), from its own `/openapi.json`.

Every documented operation (admin with the write token, feedback, the V2 data plane) gets
requests generated from the document, valid and invalid ones: never a 5xx, and every answer
has a documented status, content type and body shape. Derandomized with a fixed number of
examples, so a run is reproducible and bounded; per-status counts are printed like the other
fuzz suites'.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import (  # registered checks, looked up by name
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.rest.openapi import OPERATIONS
from tests.conftest import fraud_body
from tests.support.fuzz import FuzzGateway, fuzz_gateway, written_records

pytestmark = pytest.mark.triton

TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTE = {"champion": {"model": "fraud_v3"}, "challengers": [{"model": "fraud_v4"}]}
ROUTES = {"live": ROUTE}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXAMPLES = 10  # per operation and generation mode (the CLI run below adds the boundaries)


@pytest.fixture(scope="module")
def gateway(triton: Any, tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[FuzzGateway]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNDERSTUDY_ADMIN_TOKEN", TOKEN)
        with fuzz_gateway(triton.url, ROUTES, tmp_path_factory.mktemp("openapi"),
                          pytestconfig) as gw:
            yield gw


def base_url(gw: FuzzGateway) -> str:
    return f"http://{gw.host}:{gw.port}"


def restore(gw: FuzzGateway) -> None:
    """The live route as configured: a rollout a case started is aborted, the route put back."""
    url = base_url(gw) + "/admin/routes/live"
    requests.delete(url + "/rollout", headers=AUTH, timeout=30)  # 404/409: none running
    answer = requests.put(url, json=ROUTE, headers=AUTH, timeout=30)
    assert answer.status_code in (200, 201), answer.text


@pytest.fixture(scope="module")
def live_schema(gateway: FuzzGateway) -> Any:
    return schemathesis.openapi.from_url(base_url(gateway) + "/openapi.json")


def test_the_served_document_is_valid_and_the_docs_page_lists_it(gateway: FuzzGateway) -> None:
    answer = requests.get(base_url(gateway) + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    doc = answer.json()
    validate(doc)
    assert doc["paths"]["/v2/feedback"]["post"]["requestBody"]["content"]
    page = requests.get(base_url(gateway) + "/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert 'fetch("openapi.json")' in page.text


# One test per documented operation and generation mode (valid and invalid data). The cases
# come from the served document; `OPERATIONS` only names them (its completeness against the
# router is a unit test). Parametrized here rather than with `schemathesis.pytest.from_fixture`,
# whose lazy loader does not run under pytest 9.
def _cases() -> list[Any]:
    """(method, path, mode): invalid data only where the document constrains something (a
    body, a header or query parameter, a patterned path parameter)."""
    out = []
    for (method, path), op in sorted(OPERATIONS.items()):
        negatable = op.body is not None or path.startswith("/admin") or "{version}" in path
        for mode in schemathesis.GenerationMode:
            if mode.is_positive or negatable:
                out.append(pytest.param(method, path, mode, id=f"{method} {path} {mode}"))
    return out


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_schemathesis_against_the_live_gateway(gateway: FuzzGateway, live_schema: Any,
                                               method: str, path: str,
                                               mode: schemathesis.GenerationMode) -> None:
    operation = live_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if "{route}" in path:  # half the cases on the live route (and challenger), past the 404s
        live = {"route": "live", **({"model": "fraud_v4"} if "{model}" in path else {})}
        strategy |= operation.as_strategy(generation_mode=mode, path_parameters=live)

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call(headers=AUTH, timeout=30)
        gateway.counts[(f"{method} {path}", response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)
        if method != "GET" and path.startswith("/admin/routes/{route}") \
                and case.path_parameters.get("route") == "live" and response.status_code < 300:
            restore(gateway)  # the next case starts from the configured route again

    fuzz()


def test_a_served_inference_conforms(gateway: FuzzGateway, live_schema: Any) -> None:
    """The generated requests rarely fit the model's inputs: one that does, through the same
    checks (the 200 answer's schema included)."""
    restore(gateway)
    operation = live_schema["/v2/models/{route}/infer"]["POST"]
    case = operation.Case(path_parameters={"route": "live"},
                          body=fraud_body([[0.5] * 8], request_id="openapi-live-1"),
                          media_type="application/json")
    response = case.call(timeout=30)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 200, response.text
    assert orjson.loads(response.content)["model_name"] == "fraud_v3"


def test_schemathesis_cli_boundaries(gateway: FuzzGateway, tmp_path: Path) -> None:
    """`st run`, as a user would run it: the examples phase (the live route names the document
    offers) and the coverage phase (each documented constraint at and past its boundaries,
    every field with a wrong type: deterministic), valid and invalid data, the same checks.
    It found `PUT /admin/routes/{route}` with `"threshold": {}` answering 500 (fixed in
    `parse_route`)."""
    st = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [str(st), "run", base_url(gateway) + "/openapi.json", "--phases", "examples,coverage",
         "--checks", ",".join(c.__name__ for c in CHECKS), "--mode", "all",
         "--header", f"Authorization: Bearer {TOKEN}", "--generation-deterministic",
         "--seed", "1", "--request-timeout", "30", "--workers", "1", "--no-color"],
        capture_output=True, text=True, timeout=600, check=False,
        cwd=tmp_path)  # its cache directory goes there
    restore(gateway)  # the CLI run may have changed or deleted it
    tail = run.stdout[-4000:]
    assert run.returncode == 0, tail + run.stderr[-2000:]
    assert "No issues found" in run.stdout or " passed" in run.stdout, tail


def test_no_5xx_and_the_records_are_schema_v1(gateway: FuzzGateway) -> None:
    """Runs last: the counts cover every operation, none was a 5xx, the gateway still serves
    and everything it logged is schema v1."""
    operations = {kind for kind, _ in gateway.counts}
    assert len(operations) >= 28, sorted(operations)
    assert sum(gateway.counts.values()) >= 300
    assert [k for k in gateway.counts if k[1] >= 500] == []
    ready = requests.get(base_url(gateway) + "/v2/health/ready", timeout=10)
    assert ready.status_code == 200
    written_records(gateway)
