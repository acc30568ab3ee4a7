"""The device-side decode seam: backends chosen by what the device supports, each building its metadata on the host
and moving it in one copy, all giving the same attention; the page pool's gather/scatter used by swaps; and the
CPU results joining a layer moved to the device together. (The Triton backend is checked in
test_triton_decode.py, which runs Triton in its interpreter when there is no GPU.)"""

from __future__ import annotations

import logging

import pytest
import torch

from omniserve.attention import PagedAttention
from omniserve.attention.backends import (
    DECODE_BACKENDS, CompiledCPUDecode, TorchGatherDecode, TritonDecode, _log_choice, select_decode_backend,
)
from omniserve.attention.backends.base import move_together
from omniserve.config import ModelConfig
from omniserve.cpu_attention.kernel import compiled_kernel
from omniserve.kv_cache.page_pool import PagePool, token_slots

CPU = torch.device("cpu")
CONFIG = ModelConfig(architecture="LlamaForCausalLM", hidden_size=6 * 32, intermediate_size=64, num_layers=3,
                     num_heads=6, num_kv_heads=2, head_dim=32, vocab_size=10)
PAGE_SIZE = 4


def random_pool(dtype=torch.float64, num_pages=64) -> PagePool:
    pool = PagePool(CONFIG, num_pages=num_pages, page_size=PAGE_SIZE, device=CPU, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for tensor in pool.k + pool.v:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=dtype))
    return pool


def first_supporting(device: torch.device, dtype: torch.dtype):
    return next(backend for backend in DECODE_BACKENDS if backend.supports(device, dtype))


def mixed_spans() -> list[tuple[int, int, list[int]]]:
    """Decode rows of very different lengths on scattered pages, around a first prefill chunk and a later one."""
    spans, next_page = [], 0
    for start, count, length in [(0, 1, 1), (4, 1, 5), (0, 6, 6), (36, 1, 37), (8, 5, 13), (119, 1, 120)]:
        pages = list(range(next_page, next_page + -(-length // PAGE_SIZE)))[::-1]
        spans.append((start, count, pages))
        next_page += len(pages)
    return spans


# ------------------------------------------------------------------------------------------------- selection
def test_the_device_decides_the_backend_and_the_choice_is_logged_once(caplog):
    assert first_supporting(torch.device("cuda"), torch.bfloat16) is TritonDecode
    compiled = compiled_kernel() is not None
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert first_supporting(CPU, dtype) is (CompiledCPUDecode if compiled else TorchGatherDecode)
    assert DECODE_BACKENDS[-1].supports(torch.device("meta"), torch.float16)  # there is always one
    _log_choice.cache_clear()  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="omniserve.attention.backends"):
        for _ in range(3):
            select_decode_backend(CPU, torch.bfloat16, PAGE_SIZE)
    assert caplog.text.count(f"the {first_supporting(CPU, torch.bfloat16).name} backend") == 1
    backend = PagedAttention(random_pool(torch.bfloat16), CPU).decode_backend
    assert isinstance(backend, CompiledCPUDecode if compiled else TorchGatherDecode)


# -------------------------------------------------------------------------------------------------- metadata
def test_move_together_returns_views_of_one_buffer():
    a, b, c = torch.arange(6).view(2, 3), torch.tensor([7, 8]), torch.tensor([], dtype=torch.long)
    moved = move_together([a, b, c], CPU)
    assert [t.shape for t in moved] == [a.shape, b.shape, c.shape]
    assert torch.equal(moved[0], a) and torch.equal(moved[1], b)
    assert moved[0].untyped_storage().data_ptr() == moved[1].untyped_storage().data_ptr()


def test_iteration_indexes_arrive_in_one_buffer_and_match_the_pages():
    attention = PagedAttention(random_pool(), CPU, decode_backend=TorchGatherDecode(PAGE_SIZE, CPU))
    spans = mixed_spans()
    meta = attention.build_metadata(spans)
    expected = torch.cat([token_slots(pages, start, count, PAGE_SIZE) for start, count, pages in spans])
    assert torch.equal(meta.write_slots, expected)
    assert meta.decode.rows.tolist() == [0, 1, 8, 14]
    prefill = meta.prefill  # the first chunk (rows 2-7) and the later one (rows 9-13), in one batch
    assert prefill.rows.tolist() == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert prefill.query_starts.tolist() == [0, 6, 11] and prefill.context_lens.tolist() == [6, 13]
    assert prefill.page_table.tolist() == [spans[2][2] + [0, 0], spans[4][2]]  # padded with page 0
    storage = meta.write_slots.untyped_storage().data_ptr()
    for index in (meta.decode.rows, prefill.rows, prefill.query_starts, prefill.context_lens, prefill.page_table):
        assert index.untyped_storage().data_ptr() == storage  # one copy for all of them
    padded = meta.decode.metadata
    assert padded.mask.shape == (4, 1, 1, 120) and padded.mask.sum().item() == 1 + 5 + 37 + 120


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_cpu_backend_gives_the_same_attention(dtype):
    """Half-precision pools too: the compiled kernel converts each tile to fp32 as it reads it, the torch backend
    converts the gathered context."""
    if compiled_kernel() is None:
        pytest.skip("the compiled CPU kernel could not be built here")
    pool = random_pool(dtype)
    spans = mixed_spans()
    rows = sum(count for _, count, _ in spans)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, heads, 32, generator=generator, dtype=dtype) for heads in (6, 2, 2))
    outputs = []
    for backend in (CompiledCPUDecode(PAGE_SIZE, CPU), TorchGatherDecode(PAGE_SIZE, CPU)):
        attention = PagedAttention(pool, CPU, decode_backend=backend)
        outputs.append(attention(1, q, k, v, attention.build_metadata(spans)))
    assert outputs[0].dtype == dtype
    tolerance = {} if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)  # one rounding each
    torch.testing.assert_close(outputs[0], outputs[1], **tolerance)


# ------------------------------------------------------------------------------------------------ swap copies
def test_gather_copies_a_request_from_every_layer_and_scatter_puts_it_back():
    pool = random_pool()
    pages, num_tokens = [9, 2, 30], 10  # the last page is half used
    k, v = pool.gather(pages, num_tokens)
    assert k.shape == v.shape == (CONFIG.num_layers, num_tokens, CONFIG.num_kv_heads, CONFIG.head_dim)
    for layer in range(CONFIG.num_layers):
        for position in range(num_tokens):
            slot = pages[position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE
            assert torch.equal(k[layer, position], pool.k[layer][slot])
            assert torch.equal(v[layer, position], pool.v[layer][slot])
    k[0, 0] += 1.0  # a copy, not a view of the pool
    assert not torch.equal(k[0, 0], pool.k[0][9 * PAGE_SIZE])
    k[0, 0] -= 1.0

    elsewhere = [40, 41, 42]
    untouched = pool.k[1][42 * PAGE_SIZE + 2].clone()  # past the request's last token
    pool.scatter(elsewhere, num_tokens, k, v)
    back_k, back_v = pool.gather(elsewhere, num_tokens)
    assert torch.equal(back_k, k) and torch.equal(back_v, v)
    assert torch.equal(pool.k[1][42 * PAGE_SIZE + 2], untouched)


def test_scatter_takes_kv_in_another_dtype():
    """A bf16 pool's KV comes back from the CPU attention workers in fp32 (they attend in fp32): a swap-in stores it
    in the pool's own dtype."""
    pool = random_pool(torch.bfloat16)
    pages, num_tokens = [3, 4], 6
    k, v = pool.gather(pages, num_tokens)
    pool.scatter([20, 21], num_tokens, k.float(), v.float())
    back_k, back_v = pool.gather([20, 21], num_tokens)
    assert back_k.dtype == torch.bfloat16 and torch.equal(back_k, k) and torch.equal(back_v, v)


# ------------------------------------------------------------------------------------------------ CPU results
def test_the_cpu_results_joining_a_layer_reach_the_device_in_one_copy(tiny_model_dirs, make_llm):
    from omniserve.engine.runner import _OffloadedToken
    from omniserve.sampling.params import SamplingParams

    runner = make_llm(tiny_model_dirs["llama"][0], dtype="float64", be_decode_placement="device").engine.runner
    heads, head_dim = runner.model.config.num_heads, runner.model.config.head_dim
    results = {r: torch.full((heads, head_dim), float(i), dtype=torch.float32) for i, r in enumerate("abc")}
    for request_id, result in results.items():
        runner._offloaded[request_id] = _OffloadedToken(3, SamplingParams(), 0, result=result)
    try:
        moved = runner._results_to_device(["c", "a"])
    finally:
        runner.release(list(results))
    assert moved.shape == (2, heads, head_dim)
    assert moved.dtype == torch.float64 and moved.device.type == runner.device.type  # the pool's
    assert torch.equal(moved[0].cpu(), results["c"].double()) and torch.equal(moved[1].cpu(), results["a"].double())


def test_host_lists_become_int64_tensors():
    from omniserve.attention.backends.base import padded_page_table
    from omniserve.ops.transfer import long_tensor

    assert long_tensor([3, -1, 2**40]).tolist() == [3, -1, 2**40] and long_tensor([]).shape == (0,)
    assert long_tensor(x * 2 for x in range(3)).dtype == torch.long
    assert padded_page_table([[4, 5, 6], [7], []], torch.int32).tolist() == [[4, 5, 6], [7, 0, 0], [0, 0, 0]]
