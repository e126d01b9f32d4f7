"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis):
no input may produce a 5xx or an answer that breaks the documented schema.

The default run is derandomized (hypothesis derives its examples from the test, not from a
random seed), so CI is red or green for the code, never by chance. Before a release, run
the longer randomized search as well:

    LMS_FUZZ_RANDOM=1 LMS_FUZZ_EXAMPLES=500 python -m pytest tests/test_api_fuzz.py

A failure it finds is printed with hypothesis' reproduction seed; fix it and add the input
to tests/test_api_hostile_input.py, which runs in the default suite.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig

from tests.harness import ApiProcess
from tests.test_api_access import User

#: Operations that would end the fuzzing session itself (the token, the organization).
EXCLUDED = {("POST", "/api/v1/auth/logout"), ("POST", "/api/v1/auth/password"), ("DELETE", "/api/v1/orgs/{org}")}
RANDOM = os.environ.get("LMS_FUZZ_RANDOM", "") == "1"
EXAMPLES = int(os.environ.get("LMS_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_target(api: ApiProcess) -> Any:
    owner = User(api, "fuzz-owner@example.com")
    org = "fuzz"
    owner.call("POST", "/api/v1/orgs", {"slug": org})
    owner.call("POST", f"/api/v1/orgs/{org}/devices", {"slug": "d1"})
    owner.call("POST", f"/api/v1/orgs/{org}/assets", {"slug": "site1"})
    yield {"url": api.url, "headers": dict(owner.client.headers), "org": org}
    owner.client.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: dict[str, Any]) -> Any:
    spec = httpx.get(fuzz_target["url"] + "/schema/openapi.json", timeout=10).json()
    # The document declares its security schemes; every case authenticates as the owner, so
    # schemathesis must not also invent credentials (an invented X-API-Key would turn most
    # cases into 401s and fuzz nothing behind the authentication).
    config = SchemathesisConfig.from_dict({"generation": {"with-security-parameters": False}})
    return schemathesis.openapi.from_dict(spec, config=config)


def test_no_server_errors_and_answers_match_the_schema(api_schema: Any, fuzz_target: dict[str, Any]) -> None:
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 30
    done = 0
    for op in operations:
        if (op.method.upper(), op.path) in EXCLUDED:
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None, print_blob=RANDOM)
        def run(case: Any) -> None:
            # Aim most cases at a real organization, device and site so they pass the 404s.
            params = case.path_parameters or {}
            if "org" in params:
                params["org"] = fuzz_target["org"]
            if case.method.upper() == "GET":
                for name, value in (("device", "d1"), ("asset", "site1")):
                    if name in params:
                        params[name] = value
            response = case.call(base_url=fuzz_target["url"], headers=fuzz_target["headers"], timeout=30)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            case.validate_response(response, checks=checks)

        run()
        done += 1
    assert done >= 30
