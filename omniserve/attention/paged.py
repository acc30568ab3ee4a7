"""Paged attention over the device KV pool.

Per iteration the runner builds one `AttentionMetadata` from the plan; every layer reuses it. Rows of a batch are
grouped in two kinds:

- decode rows (one new token of a request): batched into one call, a paged Triton kernel on CUDA, the compiled CPU
  kernel (cpu_attention/csrc) on the CPU, which reads each row's slots in place; only where neither runs (bf16 on the
  CPU, no compiler) are keys gathered to [rows, longest context] with padded positions masked out;
- prefill spans (several new tokens of one request, maybe after earlier chunks): one call each, causal with an offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniserve.kv_cache.page_pool import PagePool


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
    """The rows that decode one token, in two equivalent forms: page tables for a paged kernel, and gathered slots
    for the torch fallback (built only when that fallback runs)."""

    rows: torch.Tensor
    """[num_decode] batch rows that decode one token."""
    page_table: torch.Tensor
    """[num_decode, most_pages] int32 page ids, padded with 0."""
    context_lens: torch.Tensor
    """[num_decode] int32 tokens to attend to (the new one included)."""
    context_slots: torch.Tensor | None
    """[num_decode, longest_context] KV slots to attend to, padded with slot 0 (torch fallback only)."""
    mask: torch.Tensor | None
    """[num_decode, 1, 1, longest_context] bool: True for real positions (torch fallback only)."""
    flat_slots: torch.Tensor | None = None
    """[total context] int64: each row's slots back to back (compiled CPU kernel only)."""
    offsets: torch.Tensor | None = None
    """[num_decode + 1] int64: row r's slots are flat_slots[offsets[r]:offsets[r + 1]] (compiled CPU kernel only)."""


@dataclass(frozen=True)
class AttentionMetadata:
    write_slots: torch.Tensor
    """[num_tokens] where each new token's k and v are stored."""
    decode: DecodeBatch | None
    prefills: list[PrefillSpan]


def token_slots(page_ids: list[int], start: int, count: int, page_size: int, device: torch.device) -> torch.Tensor:
    """KV slots of positions start .. start+count-1 of a request whose pages are page_ids."""
    positions = torch.arange(start, start + count, device=device)
    pages = torch.tensor(page_ids, device=device, dtype=torch.long)
    return pages[positions // page_size] * page_size + positions % page_size


class PagedAttention:
    """Attention for every layer of one model over its page pool. The decode kernel is chosen once, by device:
    a Triton kernel on CUDA (imported only there), the compiled kernel on the CPU (fp32/fp64), torch ops otherwise."""

    def __init__(self, pool: PagePool, device: torch.device) -> None:
        self.pool = pool
        self.device = device
        self._paged_decode = None
        self._cpu_kernel = None
        if device.type == "cuda":
            from omniserve.attention.triton_decode import paged_decode_attention

            self._paged_decode = paged_decode_attention
        elif pool.k[0].dtype in (torch.float32, torch.float64):
            from omniserve.cpu_attention.kernel import compiled_kernel

            self._cpu_kernel = compiled_kernel()

    def build_metadata(self, spans: list[tuple[int, int, list[int]]]) -> AttentionMetadata:
        """spans: per request in batch order, (start_position, num_new_tokens, page_ids)."""
        page_size, device = self.pool.page_size, self.device
        write_slots, prefills = [], []
        decode_rows, decode_pages, decode_lens = [], [], []
        row = 0
        for start, count, page_ids in spans:
            if count == 1:
                write_slots.append(token_slots(page_ids, start, 1, page_size, device))
                decode_rows.append(row)
                decode_pages.append(page_ids)
                decode_lens.append(start + 1)
            elif start == 0:  # a whole prompt, or its first chunk
                write_slots.append(token_slots(page_ids, 0, count, page_size, device))
                prefills.append(PrefillSpan(slice(row, row + count), None, None))
            else:  # a later chunk also attends to the earlier chunks' KV in the pool
                context = token_slots(page_ids, 0, start + count, page_size, device)
                write_slots.append(context[start:])
                key_positions = torch.arange(start + count, device=device)
                query_positions = torch.arange(start, start + count, device=device)
                mask = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)
                prefills.append(PrefillSpan(slice(row, row + count), context, mask))
            row += count
        decode = self._decode_batch(decode_rows, decode_pages, decode_lens) if decode_rows else None
        return AttentionMetadata(torch.cat(write_slots), decode, prefills)

    def _decode_batch(self, rows: list[int], pages: list[list[int]], lens: list[int]) -> DecodeBatch:
        device, page_size = self.device, self.pool.page_size
        most_pages = max(len(p) for p in pages)
        table = torch.tensor([p + [0] * (most_pages - len(p)) for p in pages], dtype=torch.int32, device=device)
        context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        row_ids = torch.tensor(rows, device=device)
        if self._paged_decode is not None:
            return DecodeBatch(row_ids, table, context_lens, None, None)
        positions = torch.arange(max(lens), device=device)
        valid = positions.unsqueeze(0) < context_lens.unsqueeze(1)
        slots = table.long()[:, positions // page_size] * page_size + positions % page_size
        if self._cpu_kernel is not None:
            offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(context_lens.long(), 0)
            return DecodeBatch(row_ids, table, context_lens, None, None, slots[valid], offsets)
        # Padding must point at written KV: masked scores still see the keys, and a never-written slot may hold
        # NaN bit patterns that survive the mask (NaN + -inf is NaN). Each row's position 0 is always written.
        slots = torch.where(valid, slots, slots[:, :1])
        return DecodeBatch(row_ids, table, context_lens, slots, valid.view(len(rows), 1, 1, -1))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """Stores this iteration's k, v in the pool, then attends. q: [num_tokens, num_heads, head_dim]."""
        self.pool.write(layer, meta.write_slots, k, v)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty_like(q)
        if meta.decode is not None:
            out[meta.decode.rows] = self._decode(q[meta.decode.rows], k_cache, v_cache, meta.decode)
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

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch):
        if self._paged_decode is not None:
            return self._paged_decode(q, k_cache, v_cache, batch.page_table, batch.context_lens, self.pool.page_size)
        if batch.flat_slots is not None:
            return self._cpu_kernel.paged_decode_attention(q, k_cache, v_cache, batch.flat_slots, batch.offsets)
        rows, heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        # GQA without copies: the query heads sharing a KV head take the place of SDPA's query-length axis.
        grouped_q = q.view(rows, kv_heads, heads // kv_heads, head_dim)
        slots = batch.context_slots.view(-1)  # index_select: several times faster than advanced indexing on the CPU
        keys = k_cache.index_select(0, slots).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, slots).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=batch.mask)
        return attended.reshape(rows, heads, head_dim)
