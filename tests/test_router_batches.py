"""Files and Batches behind the router (`serve --instances`): the single server's Batch API tests (test_batch_api),
unchanged, against a router that keeps the batches in front of two servers; and what only a router meets: an
instance lost while it runs lines, and the router's own key on the instances' line route.

`serve --instances` itself (Ray actors, kill -9 of the router and of an instance) is benchmarks/bench_router_batch.py."""

from __future__ import annotations

import time

import httpx
import pytest
import test_batch_api
from servers import ROUTER_KEY, routed_serving, slow_engine
from test_batch_api import (  # noqa: F401 - collected here, run against the router
    chat_line, client, read_jsonl, submit, test_a_chunked_upload_is_counted_as_it_is_read,
    test_a_drained_server_leaves_its_batch_to_the_next_start, test_a_file_that_is_not_a_batch_file_is_refused,
    test_a_key_sees_and_cancels_only_its_own_files_and_batches, test_an_upload_without_its_form_fields_is_a_clear_error,
    test_bad_batch_requests_get_openai_errors, test_bad_lines_go_to_the_error_file_with_their_custom_id,
    test_cancel_mid_batch_keeps_what_finished_and_frees_everything, test_completions_endpoint_and_a_named_best_effort_model,
    test_files_can_be_listed_read_and_deleted, test_metrics_count_batches_and_lines,
    test_openai_client_end_to_end_matches_the_chat_route, test_size_limits_are_flags, wait_for,
)

from omniserve.scaleout.batch_lines import BATCH_LINE_PATH, ROUTER_KEY_HEADER


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    with routed_serving(tiny_chat_model) as running:
        yield running


@pytest.fixture(autouse=True)
def _servers_are_routed(monkeypatch):
    """The tests that start a server of their own (with limits, keys or a database) get a router in front of two."""
    monkeypatch.setattr(test_batch_api, "serving", routed_serving)


def test_lines_spread_over_the_instances_and_a_lost_one_loses_no_line(tiny_chat_model):
    lines = [chat_line(f"q{i}", max_tokens=40, ignore_eos=True) for i in range(24)]
    with routed_serving(tiny_chat_model) as running, slow_engine(running, 0.01):
        client = running.client()
        batch = submit(client, lines)
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
        lost = running.servers[0]
        lost.server.force_exit = lost.server.should_exit = True  # its connections are cut, lines half-way included
        lost.thread.join(60)
        batch = wait_for(client, batch.id)
        output = read_jsonl(client, batch.output_file_id)
        for server in running.servers[1:]:
            server.wait_idle()
    assert batch.status == "completed" and batch.request_counts.completed == 24
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(24)]  # every line once, in order
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 40 for o in output)


def test_only_the_router_runs_lines_on_an_instance(tiny_chat_model):
    from test_batch_api import CHAT

    job = {"endpoint": CHAT, "body": chat_line("x")["body"], "request_id": "batch_req_x", "owner": None}
    with routed_serving(tiny_chat_model, instances=1) as running:
        url = running.servers[0].url + BATCH_LINE_PATH
        assert httpx.post(url, json=job, headers={ROUTER_KEY_HEADER: "guess"}).status_code == 403
        events = httpx.post(url, json=job, headers={ROUTER_KEY_HEADER: ROUTER_KEY}, timeout=60).text.splitlines()
        assert events[0] == '{"started": true}' and '"status": 200' in events[-1]
        running.wait_idle()


def test_lines_wait_while_no_instance_is_in_and_start_when_one_comes_in(tiny_chat_model, monkeypatch):
    with routed_serving(tiny_chat_model, instances=1) as running:
        router, down = running.app.state.router, {"now": True}
        poll = router._poll

        async def poll_unless_down(instance):
            if down["now"]:
                router.take_out(instance, "down for the test")
            else:
                await poll(instance)

        monkeypatch.setattr(router, "_poll", poll_unless_down)
        client = running.client()
        while router.instances[0].alive:
            time.sleep(0.01)
        batch = wait_for(client, submit(client, [chat_line("a"), chat_line("b")]).id,
                         lambda b: b.status == "in_progress")
        time.sleep(0.5)  # a few polls: nothing to run the lines on
        assert client.batches.retrieve(batch.id).request_counts.completed == 0
        down["now"] = False
        batch = wait_for(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 2
        running.wait_idle()
