"""Scale-out on Ray: CPU attention on remote host actors gives the device's tokens, a dead host loses no request, and
the router spreads requests over engine instances. One local Ray instance serves the whole test session."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="scale-out needs Ray (pip install 'omniserve[ray]')")

from omniserve.sampling.params import SamplingParams  # noqa: E402

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29, [42, 43]]


def greedy(service_class: str = "ls", max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance on loopback for the session: starting one costs seconds, so tests share it."""
    ray.init(num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny(tiny_model_dirs):
    return tiny_model_dirs["llama"][0]


@pytest.fixture
def reference(tiny, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="device")
    return tokens(llm.generate(PROMPTS, greedy(), use_tqdm=False))


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
    assert killed and engine.scheduler.num_rebuilt >= 1
    assert [results[str(i)] for i in range(len(PROMPTS))] == reference
    assert [h.name for h in pool.remote_hosts] != [] and killed[0] not in {h.name for h in pool.remote_hosts}
    assert pool.num_requests == 0 and pool.host_kv_bytes() == 0
