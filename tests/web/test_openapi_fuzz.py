"""Schemathesis against the served ``/openapi.json``: no 5xx, answers match the schema.

Schemathesis calls the server synchronously, so here the server runs on a trio loop of its
own in a thread; a few examples per operation keep the run short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from app.config import Settings

from .conftest import Server, server_in_thread, web_settings

EXAMPLES = 6


@pytest.fixture
def threaded_server(settings: Settings) -> Iterator[Server]:
    with server_in_thread(web_settings(settings, messages_per_minute=1000)) as server:
        yield server


def test_fuzz_every_operation(threaded_server: Server) -> None:
    server = threaded_server
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(headers=server.headers(), checks=checks, timeout=20)

        check()
