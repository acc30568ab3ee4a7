"""Paged attention over the device KV pool, in torch ops (any device).

Per iteration the runner builds one `AttentionMetadata` from the plan; every layer reuses it. Rows of a batch are
grouped in two kinds:

- decode rows (one new token of a request): batched into one call, keys gathered to [rows, longest context] and
  padded positions masked out;
- prefill spans (several new tokens of one request, maybe after earlier chunks): one call each, causal with an offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniserve.kv_cache import PagePool


@dataclass(frozen=True)
class PrefillSpan:
    rows: slice
    """The span's rows in the batch."""
    context_slots: torch.Tensor
    """[context_len] KV slots of every position up to the span's last token (earlier chunks included)."""
    mask: torch.Tensor | None
    """[span_len, context_len] bool, or None when the span starts at position 0 (plain causal)."""


@dataclass(frozen=True)
class AttentionMetadata:
    write_slots: torch.Tensor
    """[num_tokens] where each new token's k and v are stored."""
    decode_rows: torch.Tensor | None
    """[num_decode] batch rows that decode one token."""
    decode_context_slots: torch.Tensor | None
    """[num_decode, longest_context] KV slots to attend to, padded with slot 0."""
    decode_mask: torch.Tensor | None
    """[num_decode, 1, 1, longest_context] bool: True for real positions."""
    prefills: list[PrefillSpan]


def token_slots(page_ids: list[int], start: int, count: int, page_size: int, device: torch.device) -> torch.Tensor:
    """KV slots of positions start .. start+count-1 of a request whose pages are page_ids."""
    positions = torch.arange(start, start + count, device=device)
    pages = torch.tensor(page_ids, device=device, dtype=torch.long)
    return pages[positions // page_size] * page_size + positions % page_size


def build_metadata(
    spans: list[tuple[int, int, list[int]]], page_size: int, device: torch.device
) -> AttentionMetadata:
    """spans: per request in batch order, (start_position, num_new_tokens, page_ids)."""
    write_slots, decode_rows, decode_slots, prefills = [], [], [], []
    row = 0
    for start, count, page_ids in spans:
        context = token_slots(page_ids, 0, start + count, page_size, device)
        write_slots.append(context[start:])
        if count == 1:
            decode_rows.append(row)
            decode_slots.append(context)
        else:
            mask = None
            if start:
                key_positions = torch.arange(start + count, device=device)
                query_positions = torch.arange(start, start + count, device=device)
                mask = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)
            prefills.append(PrefillSpan(slice(row, row + count), context, mask))
        row += count
    decode_context = decode_mask = decode_index = None
    if decode_rows:
        longest = max(len(s) for s in decode_slots)
        decode_context = torch.zeros(len(decode_slots), longest, dtype=torch.long, device=device)
        decode_mask = torch.zeros(len(decode_slots), 1, 1, longest, dtype=torch.bool, device=device)
        for i, slots in enumerate(decode_slots):
            decode_context[i, : len(slots)] = slots
            decode_mask[i, ..., : len(slots)] = True
        decode_index = torch.tensor(decode_rows, device=device)
    return AttentionMetadata(torch.cat(write_slots), decode_index, decode_context, decode_mask, prefills)


def paged_attention(
    pool: PagePool, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Stores this iteration's k, v in the pool, then attends. q: [num_tokens, num_heads, head_dim]."""
    pool.write(layer, meta.write_slots, k, v)
    k_cache, v_cache = pool.k[layer], pool.v[layer]
    num_kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        rows = meta.decode_rows
        batch, heads, head_dim = len(rows), q.shape[1], q.shape[2]
        # GQA without copies: the query heads sharing a KV head take the place of SDPA's query-length axis.
        grouped_q = q[rows].view(batch, num_kv_heads, heads // num_kv_heads, head_dim)
        keys = k_cache[meta.decode_context_slots].transpose(1, 2)  # [batch, kv_heads, context, head_dim]
        values = v_cache[meta.decode_context_slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=meta.decode_mask)
        out[rows] = attended.reshape(batch, heads, head_dim)
    for span in meta.prefills:
        span_q = q[span.rows].transpose(0, 1).unsqueeze(0)  # [1, heads, span_len, head_dim]
        if span.mask is None:  # the whole context is this span: its keys are at hand, no gather needed
            keys, values = k[span.rows], v[span.rows]
        else:
            keys, values = k_cache[span.context_slots], v_cache[span.context_slots]
        keys = keys.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, head_dim]
        values = values.transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            span_q, keys, values, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=True
        )
        out[span.rows] = attended.squeeze(0).transpose(0, 1)
    return out
