"""The CPU kernel of paged prefill attention (ops/csrc/prefill_attention.cpp) against its meaning
(ops/reference.py: paged_prefill): one span from position 0, a later chunk over earlier chunks' KV, several spans of
different lengths in one call (spans of one row among them), pages scattered over the pool, the default model's
heads (9 query, 3 KV, head_dim 64) and Llama-3-8B's (32, 8, 128). fp64 tight, fp32 close, bf16 and fp16 within their
rounding."""

from __future__ import annotations

import pytest
import torch

from omniserve import ops
from omniserve.ops import reference

pytestmark = pytest.mark.skipif(not ops.CPU_KERNELS_BUILT, reason="the C++ extension is not built here")

TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
              torch.float16: (2e-3, 2e-3)}
SMOLLM, LLAMA3 = (9, 3, 64), (32, 8, 128)  # (heads, kv_heads, head_dim)


def _problem(spans, heads, dtype, page_size=16, seed=0):
    """The kernel's arguments for spans [(start position, rows)]: each span's pages drawn at random from one pool
    (so a context's pages are scattered, never in order), q, and a pool of random keys and values."""
    num_heads, num_kv_heads, head_dim = heads
    generator = torch.Generator().manual_seed(seed)
    pages_per_span = [-(-(start + rows) // page_size) for start, rows in spans]
    max_pages = max(pages_per_span) + 1  # a table wider than any span needs, as a batch's is
    num_pages = sum(pages_per_span) + 5
    page_ids = torch.randperm(num_pages, generator=generator)
    page_table = torch.full((len(spans), max_pages), -1, dtype=torch.long)  # unused entries: not pages
    used = 0
    for span, count in enumerate(pages_per_span):
        page_table[span, :count] = page_ids[used: used + count]
        used += count
    pool_shape = (num_pages * page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(pool_shape, generator=generator, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(pool_shape, generator=generator, dtype=torch.float64).to(dtype)
    rows = sum(count for _, count in spans)
    q = torch.randn(rows, num_heads, head_dim, generator=generator, dtype=torch.float64).to(dtype)
    query_starts = torch.tensor([0] + [count for _, count in spans]).cumsum(0)
    context_lens = torch.tensor([start + count for start, count in spans])
    return q, k_cache, v_cache, page_table, query_starts, context_lens, page_size


def _expected(q, k_cache, v_cache, *indexes):
    """The reference, in fp32 for bf16 and fp16 inputs (the kernel's arithmetic), cast back."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return reference.paged_prefill(q, k_cache, v_cache, *indexes)
    return reference.paged_prefill(q.float(), k_cache.float(), v_cache.float(), *indexes).to(q.dtype)


def _check(args):
    atol, rtol = TOLERANCES[args[0].dtype]
    got = ops.paged_prefill(*args)
    assert got.shape == args[0].shape and got.dtype == args[0].dtype
    torch.testing.assert_close(got, _expected(*args), atol=atol, rtol=rtol)


SPANS = {
    "one span from 0": [(0, 70)],
    "a later chunk": [(83, 45)],
    "several spans": [(0, 33), (200, 17), (5, 1), (0, 1), (16, 64), (40, 3)],
    "spans of one row": [(0, 1), (9, 1), (130, 1)],
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads", [SMOLLM, LLAMA3], ids=["9-3-64", "32-8-128"])
@pytest.mark.parametrize("spans", list(SPANS.values()), ids=list(SPANS))
def test_matches_the_reference(spans, heads, dtype):
    _check(_problem(spans, heads, dtype))


@pytest.mark.parametrize("heads", [(4, 4, 80), (6, 1, 32)], ids=["no GQA, head_dim 80", "one KV head, head_dim 32"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_other_head_dims_groups_and_page_sizes(heads, page_size):
    _check(_problem([(0, 21), (37, 30), (3, 1)], heads, torch.float64, page_size))


def test_the_compiled_kernel_serves_the_cpu():
    """Not the plain-torch reference that ops/ registers where the extension has no kernel for an operator."""
    cpu_kernel = [line for line in torch._C._dispatch_dump("omniserve::paged_prefill").splitlines()
                  if line.startswith("CPU:")]
    assert cpu_kernel and "prefill_attention.cpp" in cpu_kernel[0]


def test_query_rows_of_a_qkv_view_are_read_in_place():
    q, *rest = _problem([(0, 12), (30, 9)], SMOLLM, torch.float32)
    num_heads, num_kv_heads, head_dim = SMOLLM
    qkv = torch.randn(q.shape[0], (num_heads + 2 * num_kv_heads) * head_dim)
    qkv[:, : num_heads * head_dim] = q.reshape(q.shape[0], -1)
    view = qkv[:, : num_heads * head_dim].view(q.shape)  # rows apart by the QKV width
    torch.testing.assert_close(ops.paged_prefill(view, *rest), reference.paged_prefill(q, *rest), atol=1e-5,
                               rtol=1e-5)


def test_slots_past_a_context_are_never_read():
    """A pool's never-written slots may hold NaN (or anything): a span reads only its context's positions."""
    args = list(_problem([(20, 11), (0, 7)], SMOLLM, torch.float64))
    q, k_cache, v_cache, page_table, _, context_lens, page_size = args
    written = torch.zeros(k_cache.shape[0], dtype=torch.bool)
    for span, length in enumerate(context_lens.tolist()):
        positions = torch.arange(length)
        written[page_table[span][positions // page_size] * page_size + positions % page_size] = True
    expected = reference.paged_prefill(*args)
    k_cache[~written], v_cache[~written] = float("nan"), float("nan")
    torch.testing.assert_close(ops.paged_prefill(*args), expected, atol=1e-12, rtol=1e-12)


def test_peaked_attention_keeps_its_precision():
    """Scores far apart (a query much larger than usual): the weights that underflow count as nothing."""
    args = list(_problem([(0, 40), (100, 20)], SMOLLM, torch.float32))
    args[0] = args[0] * 40
    _check(tuple(args))


def test_refuses_indexes_that_would_read_outside_the_pool():
    args = list(_problem([(0, 20)], SMOLLM, torch.float32))
    bad_table = args[3].clone()
    bad_table[0, 1] = args[1].shape[0] // args[6]  # one page past the pool's last
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.paged_prefill(args[0], args[1], args[2], bad_table, *args[4:])
    with pytest.raises(RuntimeError, match="context"):  # a context longer than the span's page table reaches
        ops.paged_prefill(*args[:5], torch.tensor([10_000]), args[6])
    with pytest.raises(RuntimeError, match="query_starts"):
        ops.paged_prefill(*args[:4], torch.tensor([0, 19]), *args[5:])
