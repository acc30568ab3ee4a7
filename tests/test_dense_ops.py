"""The fused dense operators (omniserve.ops) on the CPU against their plain-torch meaning (ops/reference.py): fp64
and fp32 tight, bf16 within its rounding; rows that are views of a larger buffer (padded batches, QKV splits); the
meta device (shapes only, how a step's ops are counted)."""

from __future__ import annotations

import pytest
import torch

from omniserve import ops
from omniserve.ops import reference

pytestmark = pytest.mark.skipif(not ops.CPU_KERNELS_BUILT, reason="the C++ extension is not built here")

TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = list(TOLERANCES)


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _rows(rows: int, width: int, dtype, padded: bool):
    """[rows, width]; with `padded`, the first rows of a bigger buffer (rows apart by more than their width)."""
    generator = torch.Generator().manual_seed(rows * 1000 + width)
    if not padded:
        return torch.randn(rows, width, generator=generator).to(dtype)
    return torch.randn(rows + 3, width + 8, generator=generator).to(dtype)[:rows, :width]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 3, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_rms_norm(dtype, rows, padded):
    x = _rows(rows, 576, dtype, padded)
    weight = torch.rand(576).to(dtype) + 0.5
    _close(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 3, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_silu_and_mul(dtype, rows, padded):
    gate_up = _rows(rows, 2 * 1536, dtype, padded) * 4
    _close(ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("rows", [0, 1, 17])
def test_rope_rotates_the_query_and_key_heads_in_place(dtype, heads, rows):
    num_heads, num_kv_heads, head_dim = heads
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = _rows(rows, width, dtype, padded=True)  # the first rows of a bigger QKV output
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    angles = torch.rand(rows, head_dim // 2, dtype=angle_dtype) * 100
    expected = qkv.clone()
    reference.rope_(expected, angles.cos(), angles.sin(), num_heads, num_kv_heads, head_dim)
    ops.rope_(qkv, angles.cos(), angles.sin(), num_heads, num_kv_heads, head_dim)
    _close(qkv, expected, dtype)
    values = slice((num_heads + num_kv_heads) * head_dim, None)
    torch.testing.assert_close(qkv[:, values], expected[:, values], atol=0, rtol=0)  # value heads untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_rows_of_a_qkv_view_and_skips_negative_slots(dtype):
    num_kv_heads, head_dim, rows = 3, 64, 6
    qkv = _rows(rows, (9 + 2 * num_kv_heads) * head_dim, dtype, padded=True)
    k = qkv[:, 9 * head_dim: 12 * head_dim].view(rows, num_kv_heads, head_dim)
    v = qkv[:, 12 * head_dim:].view(rows, num_kv_heads, head_dim)
    slots = torch.tensor([5, -1, 0, 17, -1, 2])
    caches = [torch.zeros(20, num_kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    ops.store_kv(k, v, caches[0], caches[1], slots)
    reference.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0][[1, 3, 4]].abs().sum() == 0  # slots no row named stay as they were


def test_store_kv_refuses_a_slot_outside_the_pool():
    k = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.store_kv(k, k, torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.tensor([4]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_decode_reads_each_row_through_its_page_table(dtype, page_size):
    """The CPU decode kernel's page-table entry point: rows of different lengths (one a padding row reading one slot),
    pages out of order, stale table entries past a row's end (never read), GQA."""
    generator = torch.Generator().manual_seed(page_size)
    num_pages, heads, kv_heads, dim = 64 // page_size + 8, 9, 3, 64
    k_cache = torch.randn(num_pages * page_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_pages * page_size, kv_heads, dim, generator=generator).to(dtype)
    context_lens = torch.tensor([1, 37, 64])
    max_pages = 64 // page_size
    table = torch.stack([torch.randperm(num_pages, generator=generator)[:max_pages] for _ in range(3)])
    q = torch.randn(3, heads, dim, generator=generator).to(dtype)
    expected = reference.paged_decode(q, k_cache, v_cache, table, context_lens, page_size)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ops.paged_decode(q, k_cache, v_cache, table, context_lens, page_size), expected,
                               atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
    with pytest.raises(RuntimeError, match="does not fit its page table"):
        ops.paged_decode(q, k_cache, v_cache, table[:, :1], context_lens, page_size)


def test_every_operator_runs_on_the_meta_device():
    meta = torch.device("meta")
    x = torch.empty(5, 576, device=meta)
    assert ops.rms_norm(x, torch.empty(576, device=meta), 1e-5).shape == (5, 576)
    assert ops.silu_and_mul(torch.empty(5, 64, device=meta)).shape == (5, 32)
    qkv = torch.empty(5, 15 * 64, device=meta)
    ops.rope_(qkv, torch.empty(5, 32, device=meta), torch.empty(5, 32, device=meta), 9, 3, 64)
    kv = torch.empty(5, 3, 64, device=meta)
    ops.store_kv(kv, kv, torch.empty(8, 3, 64, device=meta), torch.empty(8, 3, 64, device=meta),
                 torch.empty(5, dtype=torch.long, device=meta))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_decoder_layer_equals_its_unfused_form(dtype):
    """The layer's fused form (operators, residuals added by the GEMMs) against the same layer in plain torch."""
    from omniserve.config import ModelConfig
    from omniserve.models.llama import DecoderLayer

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=96, intermediate_size=160,
                         num_layers=1, num_heads=6, num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    layer = DecoderLayer(config).to(dtype)
    for parameter in layer.parameters():
        parameter.data.normal_(0, 0.2)
    hidden = torch.randn(7, 96, dtype=dtype)
    angles = torch.rand(7, 8, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 10
    with torch.inference_mode():
        q, k, v = layer.pre_attention(hidden, (angles.cos(), angles.sin()))
        attn = torch.randn(7, 6, 16, dtype=dtype)
        out = layer.post_attention(attn, hidden)

        qkv = reference.rms_norm(hidden, layer.input_layernorm.weight, config.rms_norm_eps) @ layer.qkv_proj.weight.T
        reference.rope_(qkv, angles.cos(), angles.sin(), 6, 2, 16)
        mid = hidden + attn.reshape(7, -1) @ layer.o_proj.weight.T
        normed = reference.rms_norm(mid, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        expected = mid + reference.silu_and_mul(normed @ layer.gate_up_proj.weight.T) @ layer.down_proj.weight.T
    _close(torch.cat([q.reshape(7, -1), k.reshape(7, -1), v.reshape(7, -1)], dim=1), qkv, dtype)
    _close(out, expected, dtype)
