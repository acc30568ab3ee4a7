"""Paged decode attention as a Triton kernel (CUDA). Imported only when the device is CUDA.

One program per (sequence, KV head): it walks the sequence's pages through its page table, BLOCK tokens at a time,
and keeps an online softmax for the query heads that share the KV head, so the KV is read exactly once and never
gathered into a contiguous copy. Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, context_lens_ptr,
    scale,
    stride_q_row, stride_q_head,
    stride_kv_slot, stride_kv_head,
    stride_pt_row,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + row)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)  # the query heads served by this KV head
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :], other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, DIM_PAD]

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for start in range(0, context_len, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        pos_ok = positions < context_len
        pages = tl.load(page_table_ptr + row * stride_pt_row + positions // PAGE_SIZE, mask=pos_ok, other=0)
        slots = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_head + dims[None, :]
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK, DIM_PAD]
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)

        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK]
        scores = tl.where(pos_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max

    out = acc / running_sum[:, None]
    tl.store(
        out_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :],
    )


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    context_lens: torch.Tensor, page_size: int, block: int = 32,
) -> torch.Tensor:
    """q: [rows, heads, head_dim]; k_cache/v_cache: [slots, kv_heads, head_dim]; page_table: [rows, max_pages] and
    context_lens: [rows], int32 or int64. Returns [rows, heads, head_dim]."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    _paged_decode_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, page_table, context_lens,
        head_dim**-0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 2),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK=block,
    )
    return out
