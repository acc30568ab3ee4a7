"""The fused operators' meaning, in plain torch: what every kernel for them (ops/) must compute.

Each function here is several eager torch ops; a kernel does the same in one pass over its input. They are also the
fallback where no kernel runs. Shapes are flat token rows, as in models/llama.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] normalised in fp32 (fp64 stays fp64), cast back to x's dtype, then scaled by weight
    (the order of the reference Llama implementation)."""
    x32 = x if x.dtype == torch.float64 else x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * intermediate] (gate first) -> silu(gate) * up, [rows, intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, float_out: bool = False) -> torch.Tensor:
    """x [rows, K] @ weight [N, K].T, plus bias [N] and residual [rows, N] where given; float_out: computed and
    returned in fp32 (fp64 stays fp64) rather than rounded to x's dtype."""
    if float_out and x.dtype not in (torch.float32, torch.float64):
        return skinny_linear(x.float(), weight.float(), None if bias is None else bias.float(),
                             None if residual is None else residual.float())
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
          head_dim: int) -> None:
    """Rotate-half RoPE, in place, on the query and key heads of qkv [rows, (num_heads + 2 * num_kv_heads) *
    head_dim] (the fused QKV projection's output: query heads, key heads, value heads). cos, sin: [rows, head_dim // 2]
    per row's position; the rotation is computed in cos's dtype and stored in qkv's."""
    rows = qkv.shape[0]
    half = head_dim // 2
    heads = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(rows, num_heads + num_kv_heads, head_dim)
    x1, x2 = heads[..., :half].to(cos.dtype), heads[..., half:].to(cos.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    heads.copy_(rotated.to(qkv.dtype))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [rows, num_kv_heads, head_dim] stored at slots [rows] of k_cache, v_cache [num_slots, num_kv_heads,
    head_dim]; a row whose slot is negative is not stored (a padding row, or a row whose KV lives elsewhere)."""
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 context_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Decode attention over page tables, every shape static (no wait for the device): q [rows, heads, head_dim];
    k_cache, v_cache [slots, kv_heads, head_dim]; page_table [rows, max_pages]; context_lens [rows]. Row r attends to
    the first context_lens[r] tokens of its pages. Returns [rows, heads, head_dim]."""
    positions = torch.arange(page_table.shape[1] * page_size, device=q.device)
    slots = page_table.long()[:, positions // page_size] * page_size + positions % page_size
    valid = positions.unsqueeze(0) < context_lens.unsqueeze(1)
    # Past a row's end, its first slot: a never-written slot may hold NaN, which a zero weight does not cancel.
    slots = torch.where(valid, slots, slots[:, :1])
    return attend_slots(q, k_cache, v_cache, slots, valid.view(q.shape[0], 1, 1, -1))


def attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Each row of q [rows, heads, head_dim] attends to the KV at its slots [rows, context] (gathered), where mask
    [rows, 1, 1, context] is True. Returns [rows, heads, head_dim]."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    # GQA without copies: the query heads sharing a KV head take the place of SDPA's query-length axis.
    grouped_q = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    flat = slots.reshape(-1)  # index_select: several times faster than advanced indexing on the CPU
    keys = k_cache.index_select(0, flat).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
    attended = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=mask)
    return attended.reshape(rows, heads, head_dim)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                  query_starts: torch.Tensor, context_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Causal attention of several prefill spans at once, over their KV in the page pool (their own new tokens'
    KV already stored there): q [rows, heads, head_dim], the spans' rows back to back; k_cache, v_cache [slots,
    kv_heads, head_dim]; page_table [spans, max_pages]; query_starts [spans + 1]: span s is q's rows
    query_starts[s] .. query_starts[s + 1] - 1; context_lens [spans]: the positions span s reaches (earlier chunks'
    and its own), so its last row is at position context_lens[s] - 1 and its rows are the context's last ones.
    Each row attends to every position up to its own. Returns [rows, heads, head_dim]."""
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    for span, (first, end) in enumerate(zip(query_starts[:-1].tolist(), query_starts[1:].tolist())):
        length = int(context_lens[span])
        positions = torch.arange(length, device=q.device)
        slots = page_table[span].long()[positions // page_size] * page_size + positions % page_size
        keys, values = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
        query_positions = torch.arange(length - (end - first), length, device=q.device)
        mask = positions.unsqueeze(0) <= query_positions.unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            q[first:end].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0), attn_mask=mask, enable_gqa=heads != kv_heads)
        out[first:end] = attended.squeeze(0).transpose(0, 1)
    return out
