"""The fused dense operators as Triton kernels (CUDA): one kernel, one pass over its input, per operator of
ops/reference.py, with wrappers of the same signatures. Imported only when the device is CUDA.

The wrappers read shapes and strides only, never tensor values, so they never wait for the device: a step built from
them can be captured in a CUDA graph. Each kernel is one program per token row (or per row and column block), so any
number of rows works, rows may be views of the first rows of a bigger buffer, and no row depends on another.
Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024  # columns per silu-and-mul program: wide enough to stream, small enough to spread over the GPU
ROPE_HEADS_BLOCK = 8  # heads per RoPE program, so that a decode step of a few rows still fills several programs


def _wide(dtype: torch.dtype):
    """The type a kernel computes in for values of dtype: fp32, or fp64 for fp64 (as the reference does)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_unit_stride(tensor: torch.Tensor, name: str) -> None:
    """Written in place, so a copy cannot stand in for it: its last dimension must already be contiguous."""
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} needs a unit stride in its last dimension, got strides {tuple(tensor.stride())}")


@triton.jit
def _rms_norm_kernel(
    x_ptr, weight_ptr, out_ptr, stride_x_row, stride_out_row, hidden, eps,
    BLOCK: tl.constexpr, NORM_TYPE: tl.constexpr, PRODUCT_TYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < hidden
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=col_ok, other=0.0)
    wide = x.to(NORM_TYPE)
    mean_square = tl.sum(wide * wide, axis=0) / hidden
    normed = (wide * tl.rsqrt(mean_square + eps)).to(x.dtype)  # rounded to x's dtype before the scale, as Llama does
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
    out = weight.to(PRODUCT_TYPE) * normed.to(PRODUCT_TYPE)
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] normalised in fp32 (fp64 stays fp64), cast back to x's dtype, then scaled by weight."""
    rows, hidden = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
    if rows == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x, weight.contiguous(), out, x.stride(0), out.stride(0), hidden, eps,
        BLOCK=block, NORM_TYPE=_wide(x.dtype), PRODUCT_TYPE=_wide(out_dtype),
        num_warps=max(1, min(8, block // 256)),
    )
    return out


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, out_ptr, stride_in_row, stride_out_row, intermediate,
    BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < intermediate
    gate = tl.load(gate_up_ptr + row * stride_in_row + cols, mask=col_ok, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in_row + intermediate + cols, mask=col_ok, other=0.0)
    wide_gate = gate.to(COMPUTE)
    silu = (wide_gate / (1.0 + tl.exp(-wide_gate))).to(gate.dtype)  # rounded as the separate silu op rounds it
    out = silu.to(COMPUTE) * up.to(COMPUTE)
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * intermediate] (gate first) -> silu(gate) * up, [rows, intermediate]."""
    rows, width = gate_up.shape
    intermediate = width // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((rows, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(rows, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
        BLOCK=block, COMPUTE=_wide(gate_up.dtype), num_warps=4,
    )
    return out


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, stride_qkv_row, stride_cos_row, stride_sin_row,
    ROTATED_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    dims = tl.arange(0, HALF_PAD)
    dim_ok = dims < half
    cos = tl.load(cos_ptr + row * stride_cos_row + dims, mask=dim_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + row * stride_sin_row + dims, mask=dim_ok, other=0.0)[None, :]
    first = qkv_ptr + row * stride_qkv_row + heads[:, None] * HEAD_DIM + dims[None, :]  # each head's first half
    mask = (heads < ROTATED_HEADS)[:, None] & dim_ok[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(cos.dtype)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(cos.dtype)
    out_type = qkv_ptr.dtype.element_ty
    tl.store(first, (x1 * cos - x2 * sin).to(out_type), mask=mask)
    tl.store(first + half, (x2 * cos + x1 * sin).to(out_type), mask=mask)


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
          head_dim: int) -> None:
    """Rotate-half RoPE, in place, on the query and key heads of qkv [rows, (num_heads + 2 * num_kv_heads) *
    head_dim]; cos, sin [rows, head_dim // 2]. Computed in cos's dtype, stored in qkv's; value heads are not read."""
    rows = qkv.shape[0]
    _rows_unit_stride(qkv, "qkv")
    if rows == 0:
        return
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    rotated_heads = num_heads + num_kv_heads
    heads_block = min(ROPE_HEADS_BLOCK, triton.next_power_of_2(rotated_heads))
    _rope_kernel[(rows, triton.cdiv(rotated_heads, heads_block))](
        qkv, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0),
        ROTATED_HEADS=rotated_heads, HEAD_DIM=head_dim, HALF_PAD=triton.next_power_of_2(head_dim // 2),
        HEADS_BLOCK=heads_block, num_warps=2,
    )


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    # A negative slot masks every load and store of the row: skipped on the device, with nothing asked of the host.
    stored_heads = tl.where(slot >= 0, KV_HEADS, 0)
    mask = (heads < stored_heads) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + row * stride_k_row + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + row * stride_v_row + heads * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kc_slot + heads * stride_kc_head + dims,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc_slot + heads * stride_vc_head + dims,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [rows, num_kv_heads, head_dim] stored at slots [rows] of k_cache, v_cache [num_slots, num_kv_heads,
    head_dim]; a row whose slot is negative is not stored. k and v may be strided views (of the QKV output)."""
    rows, kv_heads, head_dim = k.shape
    _rows_unit_stride(k_cache, "k_cache")
    _rows_unit_stride(v_cache, "v_cache")
    if rows == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _store_kv_kernel[(rows,)](
        k, v, k_cache, v_cache, slots.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(kv_heads), DIM_PAD=triton.next_power_of_2(head_dim), num_warps=2,
    )
