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


def test_triton_backend_inside_paged_attention_matches_the_torch_backend():
    """The backend seam on the device: page tables built on the host and moved in one copy, decode rows among
    prefill spans, against the torch backend on the CPU. Without a GPU, the operator's CPU kernel (its page-table
    meaning, ops/reference.py) stands in for the Triton kernel, which the tests above check directly."""
    from omniserve.attention import PagedAttention
    from omniserve.attention.backends import TorchGatherDecode, TritonDecode
    from omniserve.config import ModelConfig
    from omniserve.kv_cache.page_pool import PagePool

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=9 * 64, intermediate_size=64, num_layers=1,
                         num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=10)
    generator = torch.Generator().manual_seed(0)
    cpu_pool = PagePool(config, num_pages=48, page_size=4, device=torch.device("cpu"), dtype=torch.float32)
    for tensor in cpu_pool.k + cpu_pool.v:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    device_pool = PagePool(config, num_pages=48, page_size=4, device=device, dtype=torch.float32)
    for ours, theirs in zip(device_pool.k + device_pool.v, cpu_pool.k + cpu_pool.v):
        ours.copy_(theirs)
    spans, next_page = [], 0
    for start, count, length in [(0, 1, 1), (0, 5, 5), (36, 1, 37), (8, 4, 12), (70, 1, 71)]:
        pages = list(range(next_page, next_page + -(-length // 4)))[::-1]  # scattered, in reverse order
        spans.append((start, count, pages))
        next_page += len(pages)
    q, k, v = (torch.randn(12, heads, 64, generator=generator) for heads in (9, 3, 3))
    triton_paged = PagedAttention(device_pool, device, decode_backend=TritonDecode(4, device))
    cpu = torch.device("cpu")
    torch_gather = PagedAttention(cpu_pool, cpu, decode_backend=TorchGatherDecode(4, cpu))
    got = triton_paged(0, q.to(device), k.to(device), v.to(device), triton_paged.build_metadata(spans))
    expected = torch_gather(0, q, k, v, torch_gather.build_metadata(spans))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
