"""The CUDA decode kernel, checked on the CPU through Triton's interpreter against plain attention, and on a GPU
when there is one."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU, kernels run in its CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


@pytest.fixture
def kernel():
    from omniserve.attention import triton_decode

    return triton_decode


def reference(q, k_cache, v_cache, pages, lens, page_size):
    out = []
    for row, (page_ids, length) in enumerate(zip(pages, lens)):
        pos = torch.arange(length)
        slots = torch.tensor(page_ids)[pos // page_size] * page_size + pos % page_size
        keys, values = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # [kv_heads, len, dim]
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = (q[row].unsqueeze(1) @ keys.transpose(1, 2)).squeeze(1) / q.shape[-1] ** 0.5
        out.append((scores.softmax(-1).unsqueeze(1) @ values).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, lens",
    [(9, 3, 64, [1, 17, 40]), (4, 4, 48, [33]), (8, 1, 80, [5, 64, 3]), (6, 2, 32, [100])],
    ids=["smollm-gqa", "mha-odd-dim", "mqa", "long"],
)
def test_matches_reference_attention(kernel, heads, kv_heads, head_dim, lens):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    page_size, num_pages = 16, 40
    k_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
    q = torch.randn(len(lens), heads, head_dim, generator=generator)
    order = torch.randperm(num_pages, generator=generator).tolist()  # scattered pages
    pages, used = [], 0
    for length in lens:
        count = -(-length // page_size)
        pages.append(order[used : used + count])
        used += count
    table = torch.tensor([p + [0] * (max(map(len, pages)) - len(p)) for p in pages], dtype=torch.int32)
    out = kernel.paged_decode_attention(
        q.to(device), k_cache.to(device), v_cache.to(device), table.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device), page_size, block=16,
    )
    torch.testing.assert_close(out.cpu(), reference(q, k_cache, v_cache, pages, lens, page_size), atol=1e-4, rtol=1e-4)
