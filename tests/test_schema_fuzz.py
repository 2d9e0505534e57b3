"""Schemathesis against our own OpenAPI schema, on a live server with the real model and an
authenticated user: generated requests for every operation (a bounded number each) never get a
5xx, and every response matches the schema (status, content type, body)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from benchmarks.server import BenchServer

EXAMPLES_PER_OPERATION = 15
# What the schema cannot say: credentials that fit it are still wrong ones (the token endpoint
# answers 400), an uploaded export must be one (the import answers 400), and OpenAI's messages
# and items under /v1 must come in an order (system and developer ones first, the user's last
# where the model answers) and name a served model (400, 404). The check that schema-valid data
# is accepted is left out for these operations only.
SEMANTIC_INPUT = (
    "/api/token/",
    "/api/conversations/import/",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/conversations",
    "/v1/conversations/{conversation_id}/items",
)


@pytest.fixture(scope="module")
def live_api():
    # Four-token replies keep each generated message fast; the rate limit is off so that the
    # fuzzer reaches the handlers instead of the throttle.
    server = BenchServer(env={"CHATBOT_MAX_NEW_TOKENS": "4", "CHATBOT_MESSAGES_PER_MINUTE": "0"})
    server.prepare()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fuzz(operation, server):
    """A Hypothesis test sending generated requests for one operation and checking each
    response against the schema."""
    excluded = [positive_data_acceptance] if operation.path in SEMANTIC_INPUT else []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case):
        case.call_and_validate(
            base_url=server.url, headers=server.headers, timeout=60, excluded_checks=excluded
        )

    return run


def test_api_answers_every_generated_request_within_its_schema(live_api):
    schema = schemathesis.openapi.from_url(f"{live_api.url}/api/schema/", headers=live_api.headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Revoking the key would leave the operations after it unauthenticated: it goes last.
    operations.sort(key=lambda operation: operation.label == "DELETE /api/token/")
    assert len(operations) >= 10, "the schema lists the API's operations"
    failures = []
    for operation in operations:
        try:
            fuzz(operation, live_api)()
        except (Exception, BaseExceptionGroup) as exc:  # every operation reports
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
