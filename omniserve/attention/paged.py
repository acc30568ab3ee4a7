"""Paged attention over the device KV pool.

Per iteration the runner builds one `AttentionMetadata` from the plan; every layer reuses it. Its indexes are
computed on the host from the plan's lists and reach the device in two copies (the slots, and the decode backend's
metadata), however many requests the batch holds. Rows of a batch are grouped in two kinds:

- decode rows (one new token of a request): batched into one call of the decode backend chosen for the device
  (attention/backends: a paged Triton kernel on CUDA, the compiled CPU kernel, plain torch where neither runs);
- prefill spans (several new tokens of one request, maybe after earlier chunks): one call each, causal with an offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from omniserve.attention.backends import DecodeBackend, select_decode_backend
from omniserve.attention.backends.base import move_together
from omniserve.kv_cache.page_pool import PagePool, token_slots


@dataclass(frozen=True)
class PrefillSpan:
    rows: slice
    """The span's rows in the batch."""
    context_slots: torch.Tensor | None
    """[context_len] KV slots of every position up to the span's last token (earlier chunks included), or None when
    the span starts at position 0: then its keys are this iteration's own and attention is plain causal."""
    mask: torch.Tensor | None
    """[span_len, context_len] bool, or None when the span starts at position 0."""


@dataclass(frozen=True)
class DecodeBatch:
    rows: torch.Tensor | None
    """[num_decode] batch rows that decode one token; None when they are all the batch's rows (a decode step: the
    kernel's output is the layer's, with no gather or scatter around it)."""
    metadata: object
    """What the decode backend that built it reads (backends/: page tables, flat slot lists or padded slots)."""


@dataclass(frozen=True)
class AttentionMetadata:
    write_slots: torch.Tensor
    """[num_tokens] where each new token's k and v are stored."""
    decode: DecodeBatch | None
    prefills: list[PrefillSpan]


@dataclass
class _HostIndexes:
    """An iteration's indexes on the host, before they move to the device together."""

    write_slots: torch.Tensor
    """[num_tokens] int64."""
    decode_rows: list[int] = field(default_factory=list)
    decode_pages: list[Sequence[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[slice, int, torch.Tensor | None]] = field(default_factory=list)
    """(rows, start position, [start + count] context slots) of each prefill span; no context slots for a span that
    starts at position 0."""


def _host_indexes(spans: Sequence[tuple[int, int, Sequence[int]]], page_size: int) -> _HostIndexes:
    host = _HostIndexes(torch.empty(sum(count for _, count, _ in spans), dtype=torch.long))
    decode_write_slots = []
    row = 0
    for start, count, page_ids in spans:
        rows = slice(row, row + count)
        if count == 1:
            decode_write_slots.append(page_ids[start // page_size] * page_size + start % page_size)
            host.decode_rows.append(row)
            host.decode_pages.append(page_ids)
            host.decode_lens.append(start + 1)
        elif start == 0:  # a whole prompt, or its first chunk
            host.write_slots[rows] = token_slots(page_ids, 0, count, page_size)
            host.prefills.append((rows, 0, None))
        else:  # a later chunk also attends to the earlier chunks' KV in the pool
            context = token_slots(page_ids, 0, start + count, page_size)
            host.write_slots[rows] = context[start:]
            host.prefills.append((rows, start, context))
        row += count
    if host.decode_rows:
        host.write_slots[host.decode_rows] = torch.tensor(decode_write_slots)
    return host


class PagedAttention:
    """Attention for every layer of one model over its page pool. The decode backend is chosen once, by what the
    device supports (backends.select_decode_backend), unless one is given."""

    def __init__(self, pool: PagePool, device: torch.device, decode_backend: DecodeBackend | None = None) -> None:
        self.pool = pool
        self.device = device
        self.decode_backend = decode_backend or select_decode_backend(device, pool.k[0].dtype, pool.page_size)

    def build_metadata(self, spans: Sequence[tuple[int, int, Sequence[int]]]) -> AttentionMetadata:
        """spans: per request in batch order, (start_position, num_new_tokens, page_ids)."""
        host = _host_indexes(spans, self.pool.page_size)
        contexts = [context for _, _, context in host.prefills if context is not None]
        write_slots, decode_rows, *contexts = move_together(
            [host.write_slots, torch.tensor(host.decode_rows, dtype=torch.long), *contexts], self.device)
        moved_contexts = iter(contexts)
        prefills = []
        for rows, start, context in host.prefills:
            if context is None:
                prefills.append(PrefillSpan(rows, None, None))
                continue
            context = next(moved_contexts)
            key_positions = torch.arange(len(context), device=self.device)
            query_positions = torch.arange(start, start + rows.stop - rows.start, device=self.device)
            prefills.append(PrefillSpan(rows, context, key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)))
        decode = None
        if host.decode_rows:
            decode = DecodeBatch(None if not prefills else decode_rows,
                                 self.decode_backend.build_metadata(host.decode_pages, host.decode_lens))
        return AttentionMetadata(write_slots, decode, prefills)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """Stores this iteration's k, v in the pool, then attends. q: [num_tokens, num_heads, head_dim]."""
        self.pool.write(layer, meta.write_slots, k, v)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        if meta.decode is not None and meta.decode.rows is None:
            return self.decode_backend.attend(q, k_cache, v_cache, meta.decode.metadata)
        out = torch.empty_like(q)
        if meta.decode is not None:
            rows = meta.decode.rows
            out[rows] = self.decode_backend.attend(q[rows], k_cache, v_cache, meta.decode.metadata)
        for span in meta.prefills:
            span_q = q[span.rows].transpose(0, 1).unsqueeze(0)  # [1, heads, span_len, head_dim]
            if span.mask is None:  # the whole context is this span: its keys are at hand, no gather needed
                keys, values = k[span.rows], v[span.rows]
            else:
                keys, values = k_cache.index_select(0, span.context_slots), v_cache.index_select(0, span.context_slots)
            keys = keys.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, head_dim]
            values = values.transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(
                span_q, keys, values, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=True
            )
            out[span.rows] = attended.squeeze(0).transpose(0, 1)
        return out
