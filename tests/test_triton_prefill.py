"""The CUDA prefill kernel (several spans in one launch, over the paged KV pool), checked on the CPU through Triton's
interpreter against ops/reference.py's paged_prefill, and on a GPU when there is one."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU, kernels run in its CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from omniserve.ops import reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel():
    from omniserve.attention import triton_prefill

    return triton_prefill


def make_batch(spans, heads, kv_heads, head_dim, page_size, index_dtype, seed=0):
    """spans: (query rows, context length) each. A random pool whose pages are handed out shuffled, so a span's
    pages are scattered and out of order; page tables padded with page 0."""
    generator = torch.Generator().manual_seed(seed)
    page_counts = [-(-length // page_size) for _, length in spans]
    num_pages = sum(page_counts) + 3  # a few pages no span owns
    k_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
    order = torch.randperm(num_pages, generator=generator).tolist()
    table, used = [], 0
    for count in page_counts:
        table.append(order[used : used + count] + [0] * (max(page_counts) - count))
        used += count
    rows = [count for count, _ in spans]
    query_starts = torch.tensor([0] + rows, dtype=index_dtype).cumsum(0).to(index_dtype)
    q = torch.randn(sum(rows), heads, head_dim, generator=generator)
    return (q, k_cache, v_cache, torch.tensor(table, dtype=index_dtype), query_starts,
            torch.tensor([length for _, length in spans], dtype=index_dtype))


CASES = {
    # name: (spans as (query rows, context length), heads, kv_heads, head_dim, page_size)
    "one-span-from-0": ([(21, 21)], 9, 3, 64, 8),
    "later-chunk": ([(13, 40)], 9, 3, 64, 8),
    "one-row": ([(1, 1)], 9, 3, 64, 8),
    "several-spans": ([(1, 1), (37, 37), (9, 50), (1, 70), (18, 18)], 9, 3, 64, 4),
    "llama-heads": ([(5, 5), (17, 33), (1, 9)], 32, 8, 128, 16),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_the_reference(kernel, case, dtype):
    spans, heads, kv_heads, head_dim, page_size = CASES[case]
    index_dtype = torch.int64 if case == "several-spans" else torch.int32
    q, k_cache, v_cache, *indices = make_batch(spans, heads, kv_heads, head_dim, page_size, index_dtype)
    q, k_cache, v_cache = (tensor.to(dtype) for tensor in (q, k_cache, v_cache))
    got = kernel.paged_prefill(*(tensor.to(DEVICE) for tensor in (q, k_cache, v_cache, *indices)), page_size)
    # The reference in fp32 on the same (rounded) inputs: bf16 differs only by the kernel's own roundings.
    expected = reference.paged_prefill(q.float(), k_cache.float(), v_cache.float(), *indices, page_size)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.cpu().float(), expected, atol=tolerance, rtol=tolerance)


def test_reads_the_query_through_its_strides(kernel):
    """q as the attention code slices it out of a fused qkv projection: rows not contiguous."""
    spans, heads, kv_heads, head_dim, page_size = CASES["several-spans"]
    q, k_cache, v_cache, *indices = make_batch(spans, heads, kv_heads, head_dim, page_size, torch.int32, seed=1)
    qkv = torch.cat([q, torch.zeros(q.shape[0], 2 * kv_heads, head_dim)], dim=1)
    q_view = qkv.to(DEVICE)[:, :heads]
    assert not q_view.is_contiguous()
    got = kernel.paged_prefill(q_view, *(t.to(DEVICE) for t in (k_cache, v_cache, *indices)), page_size)
    expected = reference.paged_prefill(q, k_cache, v_cache, *indices, page_size)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launches_without_waiting_for_the_device(kernel):
    """The grid comes from shapes alone: no value of query_starts or context_lens is read on the host."""
    spans, heads, kv_heads, head_dim, page_size = CASES["several-spans"]
    inputs = [t.to(DEVICE) for t in make_batch(spans, heads, kv_heads, head_dim, page_size, torch.int32)]
    kernel.paged_prefill(*inputs, page_size)  # compiles first: Triton's first launch may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernel.paged_prefill(*inputs, page_size)
    finally:
        torch.cuda.set_sync_debug_mode("default")
