"""Paged prefill attention as a Triton kernel (CUDA): every prefill span of an iteration in one launch.

Each span's queries attend causally to its whole context in the page pool (earlier chunks' KV and its own, already
stored), read in place through the span's page table: no dense mask, no gathered copy of a context.

Work is split into tiles of BLOCK_ROWS query rows, aligned to q's rows: a tile is one block of BLOCK_ROWS rows of q
cut to one span. Span s owns the tiles first_tile(s) = s + query_starts[s] // BLOCK_ROWS onwards, one per row block
it touches; first_tile is strictly increasing, so the grid needs at most cdiv(rows, BLOCK_ROWS) + spans tiles, a
size known on the host without reading query_starts (no host sync). Each program finds its span by a binary search
of first_tile over query_starts on the device; a tile left between two spans' blocks has no rows and reads nothing.

The second grid axis is the KV head: the query heads sharing it are folded into the tile's rows (one matrix of
BLOCK_ROWS x GROUP_PAD entries), so a tile reads each KV block once for its whole group. Softmax runs online in fp32; fp32 inputs multiply
in full fp32 (no TF32), bf16 ones on tensor cores with fp32 sums.
Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_TILE_ENTRIES = 64  # query rows x group heads per program: a tensor-core sized block of one matrix
_BLOCK_KEYS = 64


@triton.jit
def _find_span(query_starts_ptr, tile, num_spans, BLOCK_ROWS: tl.constexpr):
    """The last span whose first tile, span + query_starts[span] // BLOCK_ROWS, is at or before `tile`."""
    low = tl.full([], 0, tl.int32)
    high = tl.full([], 0, tl.int32) + (num_spans - 1)  # a tensor even where Triton makes num_spans a constant
    while low < high:
        middle = (low + high + 1) // 2
        found = middle + tl.load(query_starts_ptr + middle) // BLOCK_ROWS <= tile
        low = tl.where(found, middle, low)
        high = tl.where(found, high, middle - 1)
    return low


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32; UPCAST multiplies in fp32, for Triton's interpreter, whose matrix product reads
    bf16 operands as their raw bits."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attend_block(
    q, acc, running_max, running_sum, positions, start, kv_end, k_ptr, v_ptr, pages_ptr, kv_head, scale_log2,
    stride_kv_slot, stride_kv_head,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of keys into the online softmax of every entry of the tile (scores in base 2)."""
    keys = start + tl.arange(0, BLOCK_KEYS)
    key_ok = keys < kv_end
    pages = tl.load(pages_ptr + keys // PAGE_SIZE, mask=key_ok, other=0)
    slots = pages.to(tl.int64) * PAGE_SIZE + keys % PAGE_SIZE
    dims = tl.arange(0, DIM_PAD)
    kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_head + dims[None, :]
    kv_mask = key_ok[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [BLOCK_KEYS, DIM_PAD]
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)

    scores = _dot(q, tl.trans(k), UPCAST) * scale_log2  # [entries, BLOCK_KEYS]
    visible = (keys[None, :] <= positions[:, None]) & key_ok[None, :]
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)
    weights = tl.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(weights, axis=1)
    acc = acc * correction[:, None] + _dot(weights.to(v.dtype), v, UPCAST)
    return acc, new_max, running_sum


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, query_starts_ptr, context_lens_ptr,
    num_spans, scale_log2,
    stride_q_row, stride_q_head, stride_out_row, stride_out_head, stride_kv_slot, stride_kv_head, stride_pt_row,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    span = _find_span(query_starts_ptr, tile, num_spans, BLOCK_ROWS)
    span_first = tl.load(query_starts_ptr + span)
    span_end = tl.load(query_starts_ptr + span + 1)
    context_len = tl.load(context_lens_ptr + span)
    block_first = (tile - span) * BLOCK_ROWS
    first = tl.maximum(block_first, span_first)
    end = tl.minimum(block_first + BLOCK_ROWS, span_end)
    # The span's rows are its context's last ones: rows first .. end - 1 need keys up to kv_end - 1.
    kv_end = tl.where(first < end, context_len - (span_end - end), 0)

    entries = tl.arange(0, BLOCK_ROWS * GROUP_PAD)  # entry e: row block_first + e // GROUP_PAD, head e % GROUP_PAD
    rows = (block_first + entries // GROUP_PAD).to(tl.int64)
    heads = kv_head * GROUP + entries % GROUP_PAD
    entry_ok = (rows >= first) & (rows < end) & (entries % GROUP_PAD < GROUP)
    # Entries outside the span get position 0 or beyond, so no entry sees only masked keys (no 0/0 in the loop).
    positions = tl.maximum(context_len - (span_end - rows), 0)
    dims = tl.arange(0, DIM_PAD)
    io_mask = entry_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                mask=io_mask, other=0.0)  # [entries, DIM_PAD]

    running_max = tl.full([BLOCK_ROWS * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_ROWS * GROUP_PAD, DIM_PAD], tl.float32)
    pages_ptr = page_table_ptr + span.to(tl.int64) * stride_pt_row
    for start in range(0, kv_end, BLOCK_KEYS):
        acc, running_max, running_sum = _attend_block(
            q, acc, running_max, running_sum, positions, start, kv_end, k_ptr, v_ptr, pages_ptr, kv_head,
            scale_log2, stride_kv_slot, stride_kv_head, PAGE_SIZE, HEAD_DIM, DIM_PAD, BLOCK_KEYS, UPCAST,
        )
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # 0 only for entries never stored
    tl.store(out_ptr + rows[:, None] * stride_out_row + heads[:, None] * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1; older Tritons have no knobs)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs else os.environ.get("TRITON_INTERPRET", "0") == "1"


def paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    query_starts: torch.Tensor, context_lens: torch.Tensor, page_size: int,
) -> torch.Tensor:
    """Causal attention of several prefill spans in one launch (the meaning of ops/reference.py's paged_prefill):
    q [rows, heads, head_dim], the spans' rows back to back; k_cache, v_cache [slots, kv_heads, head_dim];
    page_table [spans, max_pages] int32/int64; query_starts [spans + 1]; context_lens [spans] int32/int64.
    Returns [rows, heads, head_dim]. Reads no device value on the host: the grid comes from the shapes alone."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    num_spans = query_starts.shape[0] - 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0 or num_spans <= 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_rows = max(_TILE_ENTRIES // group_pad, 1)
    grid = (triton.cdiv(rows, block_rows) + num_spans, kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, page_table, query_starts, context_lens,
        num_spans, head_dim**-0.5 * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, DIM_PAD=max(triton.next_power_of_2(head_dim), 16),
        BLOCK_ROWS=block_rows, BLOCK_KEYS=_BLOCK_KEYS, UPCAST=_interpreted(),
    )
    return out
