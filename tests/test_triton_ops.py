"""The fused dense kernels (ops/triton_ops.py) against their meaning (ops/reference.py): on the CPU through Triton's
interpreter, and on a GPU when there is one. Shapes of the default model (hidden 576, 9 heads, 3 KV heads, head_dim
64, intermediate 1536) and Llama-3-8B's per-head shapes (32 heads, 8 KV heads, head_dim 128)."""

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
# Every row count in fp32 and bf16, the other dtypes at one count: the interpreter runs each program in Python.
CASES = [(dtype, rows) for dtype in (torch.float32, torch.bfloat16) for rows in (0, 1, 3, 17)]
CASES += [(torch.float16, 3), (torch.float64, 3)]
CASE_IDS = [f"{str(dtype).removeprefix('torch.')}-{rows}rows" for dtype, rows in CASES]
TOLERANCE = {  # (atol, rtol): fp32 tight; bf16, fp16 within two roundings (the interpreter truncates to bf16)
    torch.float32: (1e-5, 1e-5), torch.float64: (1e-9, 1e-9),
    torch.bfloat16: (1e-2, 2e-2), torch.float16: (1e-3, 2e-3),
}
SMOLLM, LLAMA3 = (9, 3, 64), (32, 8, 128)  # (heads, kv_heads, head_dim)


@pytest.fixture(scope="module")
def ops():
    from omniserve.ops import triton_ops

    return triton_ops


def assert_close(got, expected):
    atol, rtol = TOLERANCE[expected.dtype]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.cpu(), expected.cpu(), atol=atol, rtol=rtol)


def padded(rows, width, dtype, generator, scale=1.0):
    """The first rows of a taller, wider buffer: a batch padded to a captured size, with a row stride of its own."""
    buffer = torch.randn(rows + 5, width + 16, generator=generator) * scale
    return buffer.to(dtype).to(DEVICE)[:rows, :width]


@pytest.mark.parametrize("dtype, rows", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("hidden", [576, 4096], ids=["smollm", "llama3"])
def test_rms_norm_matches_the_reference(ops, dtype, rows, hidden):
    generator = torch.Generator().manual_seed(rows)
    x = padded(rows, hidden, dtype, generator, scale=3.0)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype).to(DEVICE)
    assert_close(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))


def test_rms_norm_of_low_precision_rows_scaled_by_fp32_weights_is_fp32(ops):
    generator = torch.Generator().manual_seed(0)
    x = padded(3, 576, torch.bfloat16, generator)
    weight = torch.randn(576, generator=generator).to(DEVICE)
    got, expected = ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.float32
    # The normalised rows pass through bf16 before the scale; the interpreter rounds to bf16 by truncation.
    torch.testing.assert_close(got.cpu(), expected.cpu(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype, rows", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("intermediate", [1536, 96], ids=["smollm", "one-partial-block"])
def test_silu_and_mul_matches_the_reference(ops, dtype, rows, intermediate):
    gate_up = padded(rows, 2 * intermediate, dtype, torch.Generator().manual_seed(rows), scale=4.0)
    assert_close(ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))


def rope_inputs(rows, shape, dtype, generator):
    heads, kv_heads, head_dim = shape
    qkv = padded(rows, (heads + 2 * kv_heads) * head_dim, dtype, generator)
    positions = torch.randint(0, 4096, (rows,), generator=generator).float()
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    return qkv, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype, rows", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [SMOLLM, LLAMA3], ids=["smollm", "llama3"])
def test_rope_matches_the_reference_in_place_and_leaves_the_rest_of_the_buffer(ops, dtype, rows, shape):
    qkv, cos, sin = rope_inputs(rows, shape, dtype, torch.Generator().manual_seed(rows))
    buffer = qkv._base  # the whole padded buffer
    expected_buffer = buffer.clone()
    expected = expected_buffer.as_strided(qkv.shape, qkv.stride(), qkv.storage_offset())
    reference.rope_(expected, cos, sin, *shape)
    ops.rope_(qkv, cos, sin, *shape)
    rotated = slice(0, (shape[0] + shape[1]) * shape[2])
    assert_close(qkv[:, rotated], expected[:, rotated])
    expected[:, rotated] = qkv[:, rotated]
    torch.testing.assert_close(buffer, expected_buffer, atol=0, rtol=0)  # value heads, padding rows, spare columns


@pytest.mark.parametrize("dtype, rows", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [SMOLLM, LLAMA3], ids=["smollm", "llama3"])
def test_store_kv_matches_the_reference_and_skips_negative_slots(ops, dtype, rows, shape):
    heads, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(rows)
    qkv = padded(rows, (heads + 2 * kv_heads) * head_dim, dtype, generator)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)  # strided views
    v = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    num_slots = 64
    slots = torch.randperm(num_slots, generator=generator)[:rows]
    slots[::3] = -1  # padding rows, and rows whose KV is kept elsewhere
    slots = slots.to(DEVICE)
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, expected_k, expected_v, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)


def test_store_kv_takes_int32_slots(ops):
    generator = torch.Generator().manual_seed(0)
    k, v = (torch.randn(4, 3, 64, generator=generator).to(DEVICE) for _ in range(2))
    k_cache, v_cache = torch.zeros(8, 3, 64, device=DEVICE), torch.zeros(8, 3, 64, device=DEVICE)
    ops.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 0, 7], dtype=torch.int32, device=DEVICE))
    for cache, source in ((k_cache, k), (v_cache, v)):
        torch.testing.assert_close(cache[[5, 0, 7]], source[[0, 2, 3]], atol=0, rtol=0)
        assert not cache[[1, 2, 3, 4, 6]].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_kernels_replay_in_a_cuda_graph(ops):
    """No wrapper waits for the device (a sync would fail the capture), and a replay reads the buffers afresh."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = SMOLLM
    x = torch.randn(8, 576, generator=generator).to(DEVICE)
    weight = torch.randn(576, generator=generator).to(DEVICE)
    gate_up = torch.randn(8, 2 * 1536, generator=generator).to(DEVICE)
    qkv, cos, sin = rope_inputs(8, SMOLLM, torch.float32, generator)
    slots = torch.tensor([3, -1, 9, 0, -1, 30, 31, 2], device=DEVICE)
    k_cache, v_cache = (torch.zeros(32, kv_heads, head_dim, device=DEVICE) for _ in range(2))
    kv = qkv[:, heads * head_dim :].view(8, 2, kv_heads, head_dim)

    def step():
        ops.rope_(qkv, cos, sin, heads, kv_heads, head_dim)
        ops.store_kv(kv[:, 0], kv[:, 1], k_cache, v_cache, slots)
        return ops.rms_norm(x, weight, 1e-5), ops.silu_and_mul(gate_up)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    original_qkv = qkv.clone()
    with torch.cuda.graph(graph):
        normed, activated = step()
    x.mul_(2.0)
    gate_up.mul_(-1.0)
    qkv.copy_(original_qkv)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(normed, reference.rms_norm(x, weight, 1e-5))
    assert_close(activated, reference.silu_and_mul(gate_up))
    expected_qkv = original_qkv.clone()
    reference.rope_(expected_qkv, cos, sin, heads, kv_heads, head_dim)
    assert_close(qkv, expected_qkv)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    expected_kv = expected_qkv[:, heads * head_dim :].view(8, 2, kv_heads, head_dim)
    reference.store_kv(expected_kv[:, 0], expected_kv[:, 1], expected_k, expected_v, slots)
    assert_close(k_cache, expected_k)
    assert_close(v_cache, expected_v)
