"""Automatic prefix caching: full pages found again by their tokens, shared with reference counts, kept idle and
evicted least recently used; never shared across salts; every page back however a request ends; and the same tokens
with the cache as without it."""

from __future__ import annotations

import pytest

from omniserve.kv_cache import PageAllocator, PageTable, PrefixCache
from omniserve.sampling.params import SamplingParams

PAGE = 4


def cached_table(num_pages: int = 16) -> PageTable:
    return PageTable(PageAllocator(num_pages, PrefixCache()), PAGE)


def compute(table: PageTable, request_id: str, tokens: list[int], salt: str | None = None) -> int:
    """Starts a request as admission does (its cached prefix, then pages for the rest), 'computes' all its tokens
    and caches its full pages; returns the tokens it found cached."""
    hit = table.attach_cached_prefix(request_id, tokens, salt)
    table.grow(request_id, len(tokens))
    table.cache_full_pages(request_id, tokens, len(tokens), salt)
    return hit


def test_hits_partial_hits_and_the_last_token_is_always_computed():
    table = cached_table()
    prompt = list(range(10))  # two full pages and two tokens
    assert compute(table, "a", prompt) == 0
    a_pages = table.pages("a")
    assert compute(table, "same prefix, longer", prompt[:8] + [99, 98, 97]) == 8
    assert table.pages("same prefix, longer")[:2] == a_pages[:2]
    assert compute(table, "first page only", prompt[:5] + [77] * 6) == 4
    assert compute(table, "differs in page 0", [55] + prompt[1:]) == 0
    # A prompt that is all cached pages still computes its last token (its logits are needed): that page is its own.
    assert compute(table, "whole pages", prompt[:8]) == 4
    assert table.pages("whole pages")[1] != a_pages[1]
    table.allocator.check_integrity()


def test_a_page_is_keyed_by_every_token_before_it():
    table = cached_table()
    compute(table, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Page 1 holds the same tokens, after a different page 0: its KV differs, so it is not found.
    assert compute(table, "b", [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0


def test_salts_never_share_pages():
    table = cached_table()
    prompt = list(range(9))
    compute(table, "key a", prompt, salt="a")
    assert compute(table, "key b", prompt, salt="b") == 0
    assert compute(table, "no salt", prompt) == 0
    assert compute(table, "key a again", prompt, salt="a") == 8
    shared = set(table.pages("key a")) & (set(table.pages("key b")) | set(table.pages("no salt")))
    assert not shared


def test_reference_counts_and_idle_pages():
    table = cached_table(num_pages=8)
    allocator = table.allocator
    prompt = list(range(9))  # 3 pages, 2 of them full
    compute(table, "a", prompt)
    compute(table, "b", prompt)  # shares a's two full pages, has its own third
    assert allocator.num_used == 4 and allocator.num_free == 4
    table.forget("a")
    assert allocator.num_used == 3  # the shared pages are still b's; a's last (not full) page is free
    table.forget("b")
    assert allocator.num_used == 0 and allocator.num_free == 8 and len(allocator.cache) == 2  # kept, idle
    allocator.check_integrity()
    assert compute(table, "c", prompt) == 8  # taken back from the idle pages
    table.forget("c")
    allocator.check_integrity()


def test_idle_pages_are_evicted_least_recently_used_first():
    table = cached_table(num_pages=6)
    cache = table.allocator.cache
    old, new = [1] * 4 + [2], [3] * 4 + [4]  # one full page each, and one not full
    compute(table, "old", old)
    compute(table, "new", new)
    table.forget("old")
    table.forget("new")
    assert compute(table, "old again", old) == 4  # a hit makes old's page the most recently used
    table.forget("old again")
    assert cache.num_idle == 2
    table.grow("filler", 5 * PAGE)  # 4 free pages, then the least recently used idle page: new's
    assert cache.num_evicted == 1
    table.forget("filler")
    assert compute(table, "new again", new) == 0
    assert compute(table, "old third time", old) == 4
    table.allocator.check_integrity()


def test_a_key_computed_twice_keeps_its_first_page():
    """Two requests with the same prompt computed at once: the first page cached stays; the other copy is freed
    with its request."""
    table = cached_table()
    prompt = list(range(9))
    for request_id in ("a", "b"):
        table.attach_cached_prefix(request_id, prompt, None)
        table.grow(request_id, len(prompt))
    for request_id in ("a", "b"):
        table.cache_full_pages(request_id, prompt, len(prompt), None)
    assert len(table.allocator.cache) == 2
    table.forget("b")
    assert table.allocator.num_free == 16 - 3  # b's copies went back to the free list, not to the cache
    assert compute(table, "c", prompt) == 8 and table.pages("c")[:2] == table.pages("a")[:2]


def test_without_a_cache_nothing_is_found():
    table = PageTable(PageAllocator(8), PAGE)
    prompt = list(range(9))
    compute(table, "a", prompt)
    table.forget("a")
    assert compute(table, "b", prompt) == 0 and table.num_remembered == 0  # nothing hashed, nothing kept


# ------------------------------------------------------------------------------------------------- the engine
SYSTEM = list(range(200, 237))  # a shared prefix of 9 full pages and a token
PROMPTS = [SYSTEM + [5, 6, 7], SYSTEM + [8], SYSTEM + list(range(300, 311)), SYSTEM[:20], [9, 9, 9]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def run_one_by_one(llm, prompts, params=GREEDY):
    return [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]


@pytest.fixture
def uncached(tiny, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, enable_prefix_caching=False)
    return [o.outputs[0].token_ids for o in run_one_by_one(llm, PROMPTS)]


@pytest.mark.parametrize("settings", [dict(), dict(max_num_batched_tokens=8), dict(num_gpu_blocks_override=24)],
                         ids=["whole", "chunked", "preempted"])
def test_same_tokens_with_the_cache_and_prompts_are_not_computed_again(settings, uncached, tiny, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, **settings)
    first = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    outputs = [first] + run_one_by_one(llm, PROMPTS[1:])
    assert [o.outputs[0].token_ids for o in outputs] == uncached
    assert [o.num_cached_tokens for o in outputs[1:]] == [36, 36, 16, 0]
    # All at once (the cache holds them all now), and under preemption: the same tokens again.
    batched = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == uncached
    stats = llm.engine.scheduler.stats
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits
    if "num_gpu_blocks_override" in settings:
        assert stats.num_preemptions > 0


def test_every_page_comes_back_however_requests_end(tiny, make_llm):
    """Finished, aborted while prefilling, aborted while decoding, preempted: make_llm checks, after the test, that
    no page is held and the page accounting holds; idle cached pages stay cached."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=40, max_num_batched_tokens=8)
    engine = llm.engine
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS * 2):
        engine.add_request(str(index), prompt, long)
    engine.step()
    engine.abort_request("0")  # mid-prefill
    for _ in range(12):
        engine.step()
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert engine.allocator.num_used == 0 and len(engine.allocator.cache) > 0


def test_n_completions_compute_their_prompt_once(uncached, tiny, make_llm):
    """The first completion computes the prompt; its siblings wait for it (the token budget would take all three
    at once), then find it cached."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE)
    [output] = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
    assert [c.token_ids for c in output.outputs] == [uncached[0]] * 3
    assert output.num_cached_tokens == 36
    assert llm.engine.scheduler.stats.prefix_cache_hits == 2 * 36


def test_server_reports_cached_tokens_and_isolates_api_keys(tiny_chat_model):
    import httpx
    from servers import metric_samples, serving

    from omniserve.entrypoints.openai.auth import APIKeys

    prompt = SYSTEM + [5, 6, 7]

    def cached_tokens(key: str, **extra) -> int:
        response = running.post("/v1/completions", dict(model="tiny", prompt=prompt, max_tokens=2, **extra),
                                headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        return usage["prompt_tokens_details"]["cached_tokens"]

    with serving(tiny_chat_model, api_keys=APIKeys.build(["sk-a", "sk-b"])) as running:
        assert cached_tokens("sk-a") == 0
        assert cached_tokens("sk-a") == 36
        assert cached_tokens("sk-b") == 0  # another key's requests never see sk-a's pages
        assert cached_tokens("sk-a", cache_salt="tenant-1") == 0  # nor another salt's
        assert cached_tokens("sk-a", cache_salt="tenant-1") == 36
        running.wait_idle()
        samples = metric_samples(running)
        assert samples[("vllm:prefix_cache_hits_total", (("model_name", "tiny"),))] == 72
        assert samples[("vllm:prefix_cache_queries_total", (("model_name", "tiny"),))] == 5 * len(prompt)
        assert samples[("omniserve:prefix_cache_pages", (("model_name", "tiny"),))] >= 2 * 9
        load = httpx.get(running.url + "/load").json()
        assert load["prefix_cache_pages"] >= 2 * 9 and load["host_prefix_cache_pages"] == 0  # two salts' prefixes


def test_admission_counts_only_the_uncached_prompt_and_waiting_requests_take_no_pages():
    """An LS prompt whose whole prefill would miss its TTFT SLO is admitted when its cached prefix leaves little to
    compute (and one with nothing cached is rejected); requests that wait hold no page."""
    from fakes import LAYERS, MODEL, step

    from omniserve.engine.scheduler import Scheduler, SchedulerConfig
    from omniserve.engine.scheduler.request import Request

    now = [100.0]
    table = cached_table(num_pages=1024)
    scheduler = Scheduler(SchedulerConfig(iteration_budget_share=1.0, max_num_seqs=2), table, eos_token_ids=(2,),
                          num_layers=LAYERS, latency_model=MODEL, default_tpot_slo=0.05, clock=lambda: now[0])

    def add(request_id: str, prompt: list[int], ttft: float | None, max_tokens: int = 2) -> Request:
        request = Request(request_id, prompt, SamplingParams(), max_tokens, arrival_time=now[0], ttft_slo=ttft,
                          tpot_slo=0.05 if ttft else None)
        scheduler.add_request(request)
        return request

    shared = list(range(1000, 1800))
    add("first", shared + [1] * 100, None)
    while scheduler.has_unfinished():
        step(scheduler)
    on_time = add("cached", shared + [2] * 100, ttft=0.15)
    add("uncached", list(range(3000, 3900)), ttft=0.15)
    plan = step(scheduler)
    assert "uncached" in plan.rejected and on_time.num_cached_tokens == 800
    while on_time.status.value == "running":
        step(scheduler)
    blockers = [add(f"decoding {i}", [5 + i] * 10, None, max_tokens=1000) for i in range(2)]
    while not all(b.num_output_tokens for b in blockers):
        step(scheduler)
    add("waits", shared + [3] * 100, None)  # max_num_seqs is full: it waits, and holds nothing meanwhile
    add("waits too", shared + [4] * 100, None)
    for _ in range(3):
        step(scheduler)
    assert [r.request_id for r in scheduler.waiting] == ["waits", "waits too"]
    assert not table.pages("waits") and not table.pages("waits too") and table.num_requests == 2
    table.allocator.check_integrity()


# ------------------------------------------------------------------------------------------------ the host tier
def test_host_tier_keeps_evicted_pages_and_plans_saves_before_loads():
    from omniserve.kv_cache.host_tier import HostTier

    table = PageTable(PageAllocator(6, PrefixCache()), PAGE, HostTier(8))
    prompt, other, third = [1] * 4 + [2] * 4 + [3], [7] * 8 + [8], [9] * 12 + [1]
    for request_id, tokens in (("a", prompt), ("b", other)):
        assert compute(table, request_id, tokens) == 0
        table.forget(request_id)
        assert table.take_transfers() == ([], [])
        table.end_transfers()
    compute(table, "c", third)  # four pages: two free ones, then a's two idle cached pages are evicted...
    saves, loads = table.take_transfers()
    assert len(saves) == 2 and not loads  # ... and saved to the host tier
    table.end_transfers()
    table.forget("c")
    assert compute(table, "a again", prompt) == 8  # found in the host tier
    saves, loads = table.take_transfers()
    assert len(loads) == 2
    assert {page for _, page in loads} <= set(table.pages("a again"))
    table.forget("a again")  # (it ended before its plan ran) ...
    assert table.allocator.num_used == 2  # ... the loaded pages are still held, until the plan has run
    table.end_transfers()
    assert table.allocator.num_used == 0
    table.allocator.check_integrity()
    table.host_tier.check_integrity()


@pytest.mark.parametrize("host_tier", [False, True], ids=["device only", "host tier"])
def test_same_tokens_when_the_device_cache_is_too_small(host_tier, uncached, tiny, make_llm):
    """Device KV for little more than one prompt: prefixes are evicted between requests, and found again in the
    host tier (copied back) or computed again; the tokens are the same either way."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=16,
                   kv_offloading_size=1e-3 if host_tier else None)
    copies = {"saved": 0, "loaded": 0}

    def count(record) -> None:
        copies["saved"] += len(record.plan.prefix_saves)
        copies["loaded"] += len(record.plan.prefix_loads)

    llm.engine.add_iteration_observer(count)
    outputs = run_one_by_one(llm, PROMPTS + PROMPTS)
    assert [o.outputs[0].token_ids for o in outputs] == uncached + uncached
    cached = [o.num_cached_tokens for o in outputs]
    if host_tier:
        assert copies["saved"] > 0 and copies["loaded"] > 0
        assert cached[len(PROMPTS):] == [36, 36, 44, 16, 0]  # every prefix found again, whole
    else:
        assert copies == {"saved": 0, "loaded": 0} and sum(cached[len(PROMPTS):]) < sum(cached[:len(PROMPTS)]) + 36
    llm.engine.check_integrity()


def test_a_failed_iteration_leaves_no_page_its_copies_were_to_fill(uncached, tiny, make_llm):
    """The iteration that was to copy prefix pages back from the host tier fails: its requests fail, and the pages
    it was to fill are not cached (they may hold anything); the next requests compute the right tokens."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=16, kv_offloading_size=1e-3)
    engine = llm.engine
    run_one_by_one(llm, PROMPTS)  # the shared prefix is evicted to the host tier by the later prompts
    execute = engine.runner.execute

    def fail_on_loads(plan):
        if plan.prefix_loads:
            raise RuntimeError("injected")
        return execute(plan)

    engine.runner.execute = fail_on_loads
    [failed] = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
    assert failed.outputs[0].finish_reason == "error"
    engine.runner.execute = execute
    engine.check_integrity()
    assert [o.outputs[0].token_ids for o in run_one_by_one(llm, PROMPTS)] == uncached


def test_the_host_tier_gives_way_to_offloaded_kv(uncached, tiny, make_llm):
    """The host tier and the CPU pool's offloaded KV share the pool's local budget: while a BE request is offloaded,
    the tier may fill only what it leaves (its least recently used pages evicted, their memory given back), and
    it may fill the budget again once the request has ended."""
    budget = 72 * 1024  # 18 tier pages, or 72 tokens of offloaded KV
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=16, kv_offloading_size=1e-3,
                   be_decode_placement="cpu", cpu_attention_memory_gib=budget / 2**30)
    engine = llm.engine
    tier, page_bytes = engine.page_table.host_tier, 2 * 2 * PAGE * 2 * 16 * 8  # k and v, 2 layers, fp64
    assert engine.cpu_pool.config.local_memory_bytes == budget  # the whole budget: the tier takes no fixed share
    run_one_by_one(llm, PROMPTS)  # LS: the small device evicts prefixes to the tier
    filled = len(tier)
    assert filled >= 8 and tier.limit == budget // page_bytes
    seen = []
    engine.add_iteration_observer(
        lambda record: seen.append((bool(engine.cpu_pool.placement()), tier.limit, len(tier))))
    # A prompt that shares nothing, and 62 tokens of KV once done: the tier may keep 2 pages meanwhile.
    be = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, service_class="be")
    [output] = llm.generate([PROMPTS[4]], be, use_tqdm=False)
    assert output.outputs[0].token_ids[:12] == uncached[4]
    while_offloaded = [(limit, used) for offloaded, limit, used in seen if offloaded]
    assert while_offloaded and all(used <= limit <= 2 for limit, used in while_offloaded)
    engine.step()  # nothing offloaded any more: the next plan lets the tier fill the budget again
    assert tier.limit == budget // page_bytes
    engine.check_integrity()


def test_the_calibration_touches_no_page_the_cache_or_a_request_holds(uncached, tiny, tiny_profile, make_llm):
    """The engine's calibration (at start, and on its own while a server is idle) runs scratch iterations on pages
    of its own, beyond those the allocator hands out: with the device's pages all cached, it evicts none, and the
    cached prefix is found intact."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=16, kv_offloading_size=1e-3,
                   ls_tpot_slo=1.0, profile_path=str(tiny_profile[0]))
    engine = llm.engine
    run_one_by_one(llm, PROMPTS[:1])  # its prefix fills most of the device's pages, idle once it ends
    evicted, free = engine.allocator.cache.num_evicted, engine.allocator.num_free
    assert min(engine._calibration_pages) >= engine.allocator.num_pages
    engine.calibrate()
    assert engine.allocator.cache.num_evicted == evicted and engine.allocator.num_free == free
    [again] = run_one_by_one(llm, PROMPTS[:1])
    assert again.outputs[0].token_ids == uncached[0] and again.num_cached_tokens == 36


def test_a_host_tier_needs_prefix_caching(tiny, make_llm):
    from omniserve.config import ConfigError

    with pytest.raises(ConfigError, match="needs prefix caching"):
        make_llm(tiny, kv_offloading_size=0.01, enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="holds no KV page"):
        make_llm(tiny, kv_offloading_size=1e-12)


# --------------------------------------------------- offloaded requests reading their prefix in the host tier
def test_a_held_host_page_is_never_evicted_and_at_most_half_the_tier_is_held():
    from omniserve.kv_cache.host_tier import HostTier

    tier = HostTier(4)
    pages = [tier.store(bytes([i])) for i in range(4)]
    assert tier.may_hold(2) and not tier.may_hold(3)
    tier.hold(pages[0])
    tier.hold(pages[0])  # two requests read it
    tier.release(pages[0])
    assert tier.store(b"new") == pages[1]  # the least recently used page nobody holds
    tier.release(pages[0])
    assert tier.num_held == 0 and tier.store(b"newer") == pages[2]
    tier.hold(pages[3])
    tier.drop(pages[3])  # its save failed: nobody holds it any more
    assert tier.num_held == 0
    tier.check_integrity()


def test_host_kv_reads_its_prefix_in_the_host_tier():
    """A request's host KV over a prefix in the (shared) host tier: the same attention and export as with the whole
    KV of its own, and only the KV after the prefix counted as its bytes."""
    import torch

    from omniserve.config import ModelConfig
    from omniserve.cpu_attention.host_kv import HostKV
    from omniserve.kv_cache.page_pool import PagePool

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    tier = PagePool(config, num_pages=8, page_size=PAGE, device=torch.device("cpu"), dtype=torch.bfloat16,
                    shared=True)
    assert tier.k[0].is_shared()
    generator = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 21, 2, 16, generator=generator) for _ in range(2))
    prefix_pages = [5, 2, 7, 0]  # 16 tokens
    slots = torch.tensor([p * PAGE + i for p in prefix_pages for i in range(PAGE)])  # where they lie in the tier
    for layer in range(2):
        tier.k[layer][slots] = k[layer, :16].bfloat16()
        tier.v[layer][slots] = v[layer, :16].bfloat16()
    k[:, :16], v[:, :16] = k[:, :16].bfloat16().float(), v[:, :16].bfloat16().float()
    whole, prefixed = HostKV(k[:, :20], v[:, :20]), HostKV(k[:, 16:20], v[:, 16:20], tier, prefix_pages)
    assert prefixed.nbytes < whole.nbytes / 2
    q = torch.randn(4, 16, generator=generator)
    for layer in range(2):
        expected = whole.attend(layer, q, *whole.append(layer, k[layer, 20], v[layer, 20]))
        got = prefixed.attend(layer, q, *prefixed.append(layer, k[layer, 20], v[layer, 20]))
        torch.testing.assert_close(got, expected)
    for ours, theirs in zip(prefixed.export(), whole.export()):
        torch.testing.assert_close(ours, theirs)


def test_offloaded_requests_read_their_shared_prefix_in_the_host_tier(uncached, tiny, make_llm):
    """BE requests decoding in the CPU pool whose prompts hit a cached prefix hold its pages in the host tier and
    read them there in place: only the KV after the prefix goes to the pool, the tokens are the same, and every
    page is let go once they end."""
    llm = make_llm(tiny, dtype="float64", block_size=PAGE, num_gpu_blocks_override=64, kv_offloading_size=1e-3,
                   be_decode_placement="cpu")
    engine = llm.engine
    assert engine.page_table.offload_reads_host_tier
    swap_outs = []
    engine.add_iteration_observer(lambda record: swap_outs.extend(record.plan.swap_outs))
    be = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, service_class="be")
    run_one_by_one(llm, PROMPTS[:1], be)  # computes the shared prefix: the next requests' hit
    assert not any(t.host_prefix_pages for t in swap_outs)  # no hit, nothing in the tier: its own copy
    outputs = llm.generate(PROMPTS[:3], be, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == uncached[:3]
    held = [t.host_prefix_pages for t in swap_outs if t.host_prefix_pages]
    assert len(held) == 3 and len(set(held)) == 1  # one copy of the prefix, read by all three
    assert len(held[0]) * PAGE == 32  # the hit's 9 pages cut to whole tiles of 16 tokens
    engine.check_integrity()  # holds released: nothing held by an ended request


def test_a_prefix_in_the_host_tier_is_computed_again_where_that_is_faster():
    """The engine's judgement (copy time against compute time) decides whether a prefix found in the host tier is
    copied back: where computing is faster, the prefix ends before its first page in the tier."""
    from omniserve.kv_cache.host_tier import HostTier

    table = PageTable(PageAllocator(4, PrefixCache()), PAGE, HostTier(8))
    prompt = list(range(13))  # three full pages and a token
    compute(table, "a", prompt)
    table.forget("a")
    compute(table, "other", list(range(100, 113)))  # its pages evict a's first three to the host tier
    table.forget("other")
    table.take_transfers()
    table.end_transfers()
    asked = []

    def judge(start: int, count: int, copied: int) -> bool:
        asked.append((start, count, copied))
        return verdict

    table.copy_beats_recompute = judge
    verdict = False
    assert table.cached_prefix_tokens("b", prompt, None) == 0
    verdict = True
    assert table.cached_prefix_tokens("c", prompt, None) == 12
    assert asked[0] == (0, 12, 12)


def test_swap_copies_skip_the_tokens_the_host_tier_or_the_cache_holds():
    """gather from a start (a swap-out after its host prefix) and scatter from one (a swap-in after the pages the
    cache still had) move exactly the other tokens."""
    import torch

    from omniserve.config import ModelConfig
    from omniserve.kv_cache.page_pool import PagePool

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16)
    pool = PagePool(config, num_pages=8, page_size=PAGE, device=torch.device("cpu"), dtype=torch.float32)
    for layer in range(2):
        pool.k[layer].copy_(torch.randn_like(pool.k[layer]))
        pool.v[layer].copy_(torch.randn_like(pool.v[layer]))
    pages = [6, 1, 3]
    whole_k, whole_v = pool.gather(pages, 10)
    after_k, after_v = pool.gather(pages, 10, start=8)
    assert torch.equal(after_k, whole_k[:, 8:]) and torch.equal(after_v, whole_v[:, 8:])
    untouched = pool.k[0][6 * PAGE].clone()
    pool.scatter(pages, 10, torch.zeros_like(whole_k), torch.zeros_like(whole_v), start=4)
    assert torch.equal(pool.k[0][6 * PAGE], untouched)  # page 6 (tokens 0-3) was skipped
    assert not pool.gather(pages, 10, start=4)[0].any()


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_the_memory_of_evicted_host_pages_is_given_back(shared):
    """release_memory hands the pages' host memory back to the OS (they read as zeros afterwards), and only theirs:
    all of it in shared memory (page-aligned), the whole OS pages inside each run of pages otherwise."""
    import os

    import torch

    from omniserve.config import ModelConfig
    from omniserve.kv_cache.page_pool import PagePool

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=256, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64)  # a page: 4 KiB per layer's k or v
    tier = PagePool(config, num_pages=64, page_size=PAGE, device=torch.device("cpu"), dtype=torch.float32,
                    shared=shared)
    for tensor in tier.k + tier.v:
        tensor.fill_(1.0)
    tier.release_memory([3, 4, 5, 40])
    rows = lambda page: slice(page * PAGE, (page + 1) * PAGE)  # noqa: E731
    for tensor in tier.k + tier.v:
        released = tensor[rows(3).start:rows(5).stop]
        if shared:
            assert not released.any() and not tensor[rows(40)].any()
        else:  # 12 KiB from wherever the allocation puts them: all but the OS pages they start and end in
            assert int((released == 0).sum()) * 4 >= 12 * 1024 - 2 * os.sysconf("SC_PAGE_SIZE")
        for page in (2, 6, 39, 41):
            assert bool((tensor[rows(page)] == 1).all())
