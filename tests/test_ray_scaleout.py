"""Scale-out on Ray: CPU attention on remote host actors gives the device's tokens, a dead host loses no request, and
the router spreads requests over engine instances. One local Ray instance serves the whole test session."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="scale-out needs Ray (pip install 'omniserve[ray]')")

# The workload of the piggybacking tests, and (conftest's `reference`) its device-only tokens: remote hosts must give
# the same tokens.
from fakes import PROMPTS, greedy  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance on loopback for the session: starting one costs seconds, so tests share it."""
    ray.init(num_cpus=8, resources={"omniserve_cpu_host": 1}, object_store_memory=100 * 2**20,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def remote_llm(make_llm, tiny):
    """All BE decodes offloaded to two remote hosts (the local pool may hold nothing)."""
    return make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu", cpu_attention_hosts="2",
                    cpu_attention_memory_gib=0, cpu_attention_host_memory_gib=1)


def run_all(engine, on_step=None) -> dict[str, list[int]]:
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), prompt, greedy("be"))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if on_step is not None:
            on_step(engine)
    return results


def test_offloaded_requests_on_two_remote_hosts_give_device_tokens(ray_cluster, tiny, reference, make_llm):
    engine = remote_llm(make_llm, tiny).engine
    pool = engine.cpu_pool
    assert len(pool.remote_hosts) == 2
    placed = set()
    results = run_all(engine, lambda e: placed.update(e.cpu_pool.placement().values()))
    assert [results[str(i)] for i in range(len(PROMPTS))] == reference
    assert placed == {h.name for h in pool.remote_hosts}  # both hosts took requests, the local pool none
    traffic = pool.remote_traffic()
    assert traffic["messages"] > 0 and traffic["bytes_sent"] > 0 and traffic["bytes_received"] > 0
    assert pool.num_requests == 0 and pool.host_kv_bytes() == 0  # every host's KV freed


def test_auto_mode_starts_a_host_on_each_node_offering_the_resource(ray_cluster, tiny, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu", cpu_attention_hosts="auto")
    hosts = llm.engine.cpu_pool.remote_hosts
    assert len(hosts) == 1 and hosts[0].node_id == ray.get_runtime_context().get_node_id()


def test_bad_scale_out_settings_are_clear_errors(ray_cluster, tiny, make_llm):
    from omniserve.config import ConfigError
    from omniserve.engine.args import EngineArgs
    from omniserve.scaleout.instances import start_instances

    with pytest.raises(ConfigError, match="number of hosts or `auto`"):
        make_llm(tiny, be_decode_placement="cpu", cpu_attention_hosts="two")
    with pytest.raises(ConfigError, match="9 engine instances need 9 GPUs or CPUs"):
        start_instances(EngineArgs(model=tiny), ["tiny"], count=9)  # the session's cluster has 8 CPUs


def test_killed_host_loses_no_request(ray_cluster, tiny, reference, make_llm):
    engine = remote_llm(make_llm, tiny).engine
    pool = engine.cpu_pool
    killed = []

    def kill_a_busy_host(engine):
        if killed:
            return
        busy = [h for h in pool.remote_hosts if h.requests]
        if busy and engine.runner.num_offloaded_in_flight:
            killed.append(busy[0].name)
            ray.kill(busy[0].actor)

    results = run_all(engine, kill_a_busy_host)
    assert killed and engine.scheduler.stats.num_rebuilt >= 1
    assert [results[str(i)] for i in range(len(PROMPTS))] == reference
    assert [h.name for h in pool.remote_hosts] != [] and killed[0] not in {h.name for h in pool.remote_hosts}
    assert pool.num_requests == 0 and pool.host_kv_bytes() == 0


# ---------------------------------------------------------------------------------------------------------- router
def fake_instances(reports: dict[str, dict], down: set[str]):
    """httpx transport standing in for instances: /load gives each one's report; a completion answers with the
    instance's name; instances in `down` refuse connections."""
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        name = request.url.host
        if name in down:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/load":
            return httpx.Response(200, json={**reports[name], "models": {"m": None, "m-batch": "be"}})
        return httpx.Response(200, json={"instance": name})

    return httpx.MockTransport(handle)


def test_an_instance_lost_while_answering_ends_its_stream_with_an_error_event():
    """The instance dies mid-stream: the client gets what was sent, then OpenAI's error event and [DONE], and the
    instance is taken out; one lost before it answered is a 502."""
    import asyncio

    import httpx

    from omniserve.scaleout.router import Router, build_router_app

    class DiesMidStream(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b'data: {"choices": [{"text": "hel"}]}\n\n'
            raise httpx.ReadError("connection reset by peer")

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/load":
            return httpx.Response(200, json={"ls_headroom": 1.0, "be_spare_tokens": 10, "models": {"m": None}})
        if request.url.host == "quiet":
            raise httpx.RemoteProtocolError("server disconnected without sending a response", request=request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=DiesMidStream())

    async def scenario(url: str) -> tuple[httpx.Response, Router]:
        router = Router([url], transport=httpx.MockTransport(handle))
        app = build_router_app(router)
        await router.poll_once()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            response = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        return response, router

    streamed, router = asyncio.run(scenario("http://dies"))
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[0] == 'data: {"choices": [{"text": "hel"}]}' and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "instance_lost"
    assert not router.instances[0].alive
    refused, router = asyncio.run(scenario("http://quiet"))
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "instance_lost"
    assert not router.instances[0].alive


def test_the_routers_metrics_sum_the_instances():
    import asyncio

    import httpx
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from omniserve.scaleout.router import Router, build_router_app

    def instance_metrics(tokens: float, running: float, usage: float) -> bytes:
        registry = CollectorRegistry()
        Counter("vllm:generation_tokens", "t", ["model_name"], registry=registry).labels("m").inc(tokens)
        Gauge("vllm:num_requests_running", "r", ["model_name"], registry=registry).labels("m").set(running)
        Gauge("vllm:kv_cache_usage_perc", "u", ["model_name"], registry=registry).labels("m").set(usage)
        Histogram("vllm:time_to_first_token_seconds", "h", ["model_name"], buckets=(1.0,),
                  registry=registry).labels("m").observe(running)
        return generate_latest(registry)

    texts = {"a": instance_metrics(10, 0.5, 0.2), "b": instance_metrics(5, 2, 0.6)}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/load":
            return httpx.Response(200, json={"ls_headroom": 1.0, "be_spare_tokens": 10, "models": {"m": None}})
        return httpx.Response(200, content=texts[request.url.host])

    async def scrape() -> str:
        router = Router(["http://a", "http://b"], transport=httpx.MockTransport(handle))
        app = build_router_app(router)
        await router.poll_once()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            return (await client.get("/metrics")).text

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(asyncio.run(scrape())) for s in family.samples}
    m = (("model_name", "m"),)
    assert samples[("vllm:generation_tokens_total", m)] == 15 and samples[("vllm:num_requests_running", m)] == 2.5
    assert samples[("vllm:kv_cache_usage_perc", m)] == pytest.approx(0.4)  # a share: the mean
    assert samples[("vllm:time_to_first_token_seconds_count", m)] == 2
    assert samples[("vllm:time_to_first_token_seconds_bucket", (("le", "1.0"), *m))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_router_sends_ls_by_headroom_be_by_spare_capacity_and_takes_dead_instances_out():
    import asyncio

    import httpx

    from omniserve.scaleout.router import Router, build_router_app

    reports = {"a": {"ls_headroom": 0.8, "be_spare_tokens": 1000, "max_num_seqs": 10},
               "b": {"ls_headroom": 0.3, "be_spare_tokens": 50_000, "max_num_seqs": 10}}
    down: set[str] = set()
    router = Router(["http://a", "http://b"], transport=fake_instances(reports, down))
    app = build_router_app(router)

    async def scenario():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")

        async def send(body) -> str:
            response = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 8,
                                                                  **body})
            assert response.status_code == 200
            return response.json()["instance"]

        await router.poll_once()
        assert await send({}) == "a"  # LS: the most SLO headroom
        assert await send({"service_tier": "flex"}) == "b"  # BE: the most spare capacity
        assert await send({"priority": 1}) == "b" and await send({"model": "m-batch"}) == "b"
        # Requests sent since the last report count: a's headroom 0.8 - 0.1 per LS request falls below b's 0.3.
        picks = [await send({}) for _ in range(6)]
        assert picks[:5] == ["a"] * 5 and picks[5] == "b"
        await router.poll_once()  # fresh reports reset what was charged
        assert await send({}) == "a"
        down.add("a")  # a dies: its connection is refused; the request goes to b, and a is out
        assert await send({}) == "b"
        assert not router.instances[0].alive
        await router.poll_once()
        assert not router.instances[0].alive and (await client.get("/health")).status_code == 200
        down.add("b")
        await router.poll_once()
        response = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_instance"
        assert (await client.get("/health")).status_code == 503
        down.clear()
        await router.poll_once()  # back after a good poll
        assert await send({}) == "a"
        metrics = (await client.get("/metrics")).text
        assert 'omniserve:router_requests_total{instance="http://b",service_class="be"} 3.0' in metrics
        # Files and Batches are the router's own (tests/test_router_batches.py), never sent to an instance.
        assert (await client.get("/v1/files")).json()["data"] == []
        response = await client.get("/v1/batches/batch_1")
        assert response.status_code == 404 and response.json()["error"]["code"] == "batch_not_found"
        await client.aclose()

    asyncio.run(scenario())


def test_two_engine_instances_behind_the_router(ray_cluster, tiny):
    import asyncio

    import httpx

    from omniserve.engine.args import EngineArgs
    from omniserve.entrypoints.openai.serving import RequestLimits
    from omniserve.scaleout.instances import start_instances
    from omniserve.scaleout.router import Router, build_router_app

    args = EngineArgs(model=tiny, dtype="float32", be_decode_placement="device", max_num_seqs=8)
    urls, actors = start_instances(args, ["tiny"], count=2, limits=RequestLimits(max_n=3))
    assert all(url.startswith("http://127.0.0.1:") for url in urls), urls  # where --host says (its default)
    router = Router(urls, poll_interval_s=0.2)
    app = build_router_app(router)

    async def scenario():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=60)

        async def complete(service_tier: str | None = None, stream: bool = False):
            body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            if service_tier:
                body["service_tier"] = service_tier
            if stream:
                body["stream"] = True
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response

        await router.poll_once()
        assert all(i.alive for i in router.instances)
        report = router.instances[0].report  # the instance's own /load
        assert report["models"] == {"tiny": None, "tiny-batch": "be"} and report["ls_headroom"] == 1.0
        assert report["be_spare_tokens"] > 0 and report["running"] == report["waiting"] == 0
        texts = {(await complete()).json()["choices"][0]["text"] for _ in range(4)}
        texts |= {(await complete("flex")).json()["choices"][0]["text"] for _ in range(4)}
        assert len(texts) == 1  # the same greedy completion from either instance
        streamed = await complete(stream=True)
        assert streamed.text.rstrip().endswith("data: [DONE]")
        refused = await client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[1], "n": 4})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"  # the server's limits
        routed = {(s.labels["instance"], s.labels["service_class"]): s.value
                  for metric in router.registry.collect() if metric.name == "omniserve:router_requests"
                  for s in metric.samples if s.name.endswith("_total")}
        assert {url for url, _ in routed} == set(urls)  # both instances served requests
        ray.kill(actors[0])  # returns at once: the actor's process ends a moment later
        for _ in range(100):
            await router.poll_once()
            if not router.instances[0].alive:
                break
            await asyncio.sleep(0.1)
        assert [i.alive for i in router.instances] == [False, True]
        for tier in (None, "flex", None):
            await complete(tier)  # all to the live instance
        await client.aclose()

    asyncio.run(scenario())
    for actor in actors[1:]:
        ray.kill(actor)


def test_sigterm_drains_the_instances_behind_the_router(ray_cluster, tiny):
    """SIGTERM to `serve --instances`: new requests get 503 at once, a running stream ends properly ([DONE], after
    the `draining` event if its grace period ran out), the instances stop, and the router exits."""
    import threading
    import time

    import httpx

    from omniserve.engine.args import EngineArgs
    from omniserve.entrypoints.openai import listen_socket
    from omniserve.scaleout.instances import drain_instances, start_instances
    from omniserve.scaleout.router import DrainingRouter, Router, build_router_app, router_config

    args = EngineArgs(model=tiny, dtype="float32", be_decode_placement="device")
    urls, actors = start_instances(args, ["tiny"], count=1, drain_grace_s=0.0)
    router = Router(urls, poll_interval_s=0.2)
    app = build_router_app(router)
    server = DrainingRouter(router_config(app, "warning"), router, lambda: drain_instances(actors))
    sock = listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lines = []
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "n": 32, "ignore_eos": True,
            "stream": True}) as stream:
        for line in stream.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 1:
                server.handle_exit(15, None)  # SIGTERM
                refused = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS[1]}, timeout=10)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert lines[-1] == "data: [DONE]"
    if len(lines) > 2 and "error" in lines[-2]:
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "draining"
    thread.join(timeout=30)
    assert not thread.is_alive(), "the router did not exit after the drain"
