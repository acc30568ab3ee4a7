"""The CPU decode-attention kernel and the host KV store, against plain attention."""

from __future__ import annotations

import pytest
import torch

from omniserve.cpu_attention.host_kv import HostKV
from omniserve.cpu_attention.kernel import (
    compiled_kernel, decode_attention, decode_attention_reference, tile_keys, untile_keys,
)


def naive(q, k, v):
    """Per head, written out: q [heads, dim], k/v [kv_heads, len, dim]."""
    heads, dim = q.shape
    group = heads // k.shape[0]
    out = []
    for h in range(heads):
        keys, values = k[h // group], v[h // group]
        weights = torch.softmax(keys @ q[h] / dim**0.5, dim=0)
        out.append(weights @ values)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, length",
    [(9, 3, 64, 1), (9, 3, 64, 17), (32, 8, 128, 300), (4, 4, 48, 33), (8, 1, 80, 129), (28, 4, 128, 1000),
     (6, 6, 32, 16)],
)
def test_kernel_matches_reference(dtype, heads, kv_heads, dim, length):
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(heads, dim, generator=generator, dtype=dtype)
    k = torch.randn(kv_heads, length, dim, generator=generator, dtype=dtype)
    v = torch.randn(kv_heads, length, dim, generator=generator, dtype=dtype)
    expected = naive(q, k, v)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(decode_attention(q, tile_keys(k, capacity_tiles=100), v), expected, **tolerance)
    torch.testing.assert_close(decode_attention_reference(q, k, v), expected, **tolerance)


def test_kernel_is_built_here():
    assert compiled_kernel() is not None, "the compiled CPU kernel did not build; see the warning in the log"


def test_host_kv_appends_grow_and_export_round_trips():
    layers, tokens, kv_heads, dim = 2, 5, 3, 16
    k = torch.randn(layers, tokens, kv_heads, dim)
    v = torch.randn(layers, tokens, kv_heads, dim)
    kv = HostKV(k, v)
    extra_k, extra_v = torch.randn(40, layers, kv_heads, dim), torch.randn(40, layers, kv_heads, dim)
    for step in range(40):  # past the first capacity, so buffers grow
        for layer in range(layers):
            key_tiles, values = kv.append(layer, extra_k[step, layer], extra_v[step, layer])
            assert values.shape[1] == tokens + step + 1
            full_k = torch.cat([k[layer], extra_k[: step + 1, layer]]).transpose(0, 1)
            torch.testing.assert_close(untile_keys(key_tiles, values.shape[1]), full_k)
    out_k, out_v = kv.export()
    torch.testing.assert_close(out_k, torch.cat([k, extra_k.transpose(0, 1)], dim=1))
    torch.testing.assert_close(out_v, torch.cat([v, extra_v.transpose(0, 1)], dim=1))
    kv.append(0, extra_k[0, 0], extra_v[0, 0])
    with pytest.raises(RuntimeError, match="middle of a token"):
        kv.export()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_paged_decode_matches_the_torch_path(dtype):
    """The device's own decode attention when the device is the CPU: the compiled kernel reads each row's slots in
    place; the torch path gathers and pads. Same result, rows of very different lengths, GQA groups of 3."""
    from omniserve.attention import PagedAttention
    from omniserve.config import ModelConfig
    from omniserve.kv_cache import PagePool

    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=9 * 64, intermediate_size=64, num_layers=1,
                         num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=10)
    pool = PagePool(config, num_pages=64, page_size=4, device=torch.device("cpu"), dtype=dtype)
    torch.manual_seed(0)
    pool.k[0].normal_()
    pool.v[0].normal_()
    compiled = PagedAttention(pool, torch.device("cpu"))
    fallback = PagedAttention(pool, torch.device("cpu"))
    fallback._cpu_kernel = None
    lens = [1, 5, 37, 120]
    spans, first_page = [], 0
    for length in lens:
        pages = list(range(first_page, first_page + -(-length // 4)))[::-1]  # scattered, in reverse order
        spans.append((length - 1, 1, pages))
        first_page += len(pages)
    q, k, v = (torch.randn(len(lens), heads, 64, dtype=dtype) for heads in (9, 3, 3))
    assert compiled._cpu_kernel is not None
    got = compiled(0, q, k, v, compiled.build_metadata(spans))
    expected = fallback(0, q, k, v, fallback.build_metadata(spans))
    torch.testing.assert_close(got, expected)
