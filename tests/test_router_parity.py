"""The single server's tests of limits (test_server_limits) and of the drain's end of a stream (test_server),
unchanged, against the router in front of two servers: the router refuses what a server refuses, with the same
answers (the body size itself, the rest the instances through it), and a drain ends a stream as one server does.
(The Batch API's: test_router_batches.py.)"""

from __future__ import annotations

import pytest
import test_server
import test_server_limits
from servers import routed_serving
from test_server import test_grace_period_over_ends_streams_properly  # noqa: F401 - run against the router
from test_server_limits import (  # noqa: F401 - collected here, run against the router
    test_a_body_over_the_limit_gets_413_before_it_is_parsed, test_a_huge_prompt_is_refused_at_once_and_stalls_no_stream,
    test_a_method_a_path_lacks_gets_405_naming_every_method_it_has,
    test_a_request_of_many_prompts_is_refused_before_any_runs, test_each_declared_bound_is_the_one_the_server_enforces,
    test_echo_gives_back_the_prompt_as_sent, test_inputs_beyond_the_api_or_the_limits_are_refused,
    test_limits_are_flags_and_fields_that_change_nothing_are_accepted, test_values_of_another_json_type_are_refused,
)


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    with routed_serving(tiny_chat_model) as running:
        yield running


@pytest.fixture(autouse=True)
def _servers_are_routed(monkeypatch):
    monkeypatch.setattr(test_server_limits, "serving", routed_serving)
    monkeypatch.setattr(test_server, "serving", routed_serving)
