"""Paged attention over the device KV pool.

Per iteration the runner builds one `AttentionMetadata` from the plan; every layer reuses it. Its indexes are
computed on the host from the plan's lists and reach the device in two copies (the slots and prefill indexes, and
the decode backend's metadata), however many requests the batch holds. A layer stores its new K and V in the pool
first, then attends, in two kinds of rows:

- decode rows (one new token of a request): batched into one call of the decode backend chosen for the device
  (attention/backends: a paged Triton kernel on CUDA, the compiled CPU kernel, plain torch where neither runs);
- prefill spans (several new tokens of one request, maybe after earlier chunks): all in one call of the paged_prefill
  operator (ops/: Triton on CUDA, C++ on the CPU), causal, reading each span's context in place through its page table:
  no copy of an earlier chunk's KV, no mask tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from omniserve import ops
from omniserve.attention.backends import DecodeBackend, select_decode_backend
from omniserve.attention.backends.base import move_together, padded_page_table
from omniserve.kv_cache.page_pool import PagePool, token_slots
from omniserve.ops.transfer import long_tensor


@dataclass(frozen=True)
class PrefillBatch:
    """Every prefill span of the iteration, for one paged_prefill call."""

    rows: torch.Tensor | None
    """[prefill rows] the spans' rows in the batch, back to back; None when they are all the batch's rows."""
    page_table: torch.Tensor
    """[spans, most pages] each span's request's pages (padded with page 0)."""
    query_starts: torch.Tensor
    """[spans + 1] span s is rows query_starts[s] .. query_starts[s + 1] - 1 of the prefill rows."""
    context_lens: torch.Tensor
    """[spans] the positions each span reaches (its earlier chunks' and its own)."""


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
    prefill: PrefillBatch | None


@dataclass
class _HostIndexes:
    """An iteration's indexes on the host, before they move to the device together."""

    write_slots: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    decode_pages: list[Sequence[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefill_rows: list[int] = field(default_factory=list)
    prefill_pages: list[Sequence[int]] = field(default_factory=list)
    prefill_starts: list[int] = field(default_factory=lambda: [0])
    prefill_lens: list[int] = field(default_factory=list)


def _host_indexes(spans: Sequence[tuple[int, int, Sequence[int]]], page_size: int) -> _HostIndexes:
    host = _HostIndexes()
    row = 0
    for start, count, page_ids in spans:
        if count == 1:  # plain arithmetic: a tensor per decode row would cost the host more than the row
            host.write_slots.append(page_ids[start // page_size] * page_size + start % page_size)
            host.decode_rows.append(row)
            host.decode_pages.append(page_ids)
            host.decode_lens.append(start + 1)
        else:
            host.write_slots.extend(token_slots(page_ids, start, count, page_size).tolist())
            host.prefill_rows.extend(range(row, row + count))
            host.prefill_pages.append(page_ids)
            host.prefill_starts.append(host.prefill_starts[-1] + count)
            host.prefill_lens.append(start + count)
        row += count
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
        return self.build_inputs(spans)[0]

    def build_inputs(self, spans: Sequence[tuple[int, int, Sequence[int]]], *riders: Sequence[int]
                     ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """The metadata of `spans` (as build_metadata) and `riders`, other int64 lists of the iteration (the
        runner's token ids and positions), on the device: everything in one copy."""
        host = _host_indexes(spans, self.pool.page_size)
        every_row = not (host.decode_rows and host.prefill_rows)  # one kind only: no gather or scatter of rows
        indexes = [host.write_slots, host.decode_rows, host.prefill_rows, host.prefill_starts, host.prefill_lens]
        tensors = [long_tensor(values) for values in (*riders, *indexes)]
        if host.prefill_pages:
            tensors.append(padded_page_table(host.prefill_pages, torch.long))
        own = len(tensors)
        if host.decode_rows:  # the decode kernel's metadata rides in the same copy
            tensors += self.decode_backend.host_metadata(host.decode_pages, host.decode_lens)
        moved = move_together(tensors, self.device)
        riders_moved, decode_moved = moved[:len(riders)], moved[own:]
        write_slots, decode_rows, prefill_rows, starts, lens, *table = moved[len(riders):own]
        prefill = None
        if host.prefill_rows:
            prefill = PrefillBatch(None if every_row else prefill_rows, table[0], starts, lens)
        decode = None
        if host.decode_rows:
            decode = DecodeBatch(None if every_row else decode_rows, self.decode_backend.metadata(decode_moved))
        return AttentionMetadata(write_slots, decode, prefill), riders_moved

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """Stores this iteration's k, v in the pool, then attends. q: [num_tokens, num_heads, head_dim]."""
        self.pool.write(layer, meta.write_slots, k, v)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        decode, prefill = meta.decode, meta.prefill
        if decode is not None and decode.rows is None:
            return self.decode_backend.attend(q, k_cache, v_cache, decode.metadata)
        if prefill is not None and prefill.rows is None:
            return self._prefill(q, k_cache, v_cache, prefill)
        out = torch.empty_like(q)
        out.index_copy_(0, decode.rows, self.decode_backend.attend(
            q.index_select(0, decode.rows), k_cache, v_cache, decode.metadata))
        out.index_copy_(0, prefill.rows, self._prefill(q.index_select(0, prefill.rows), k_cache, v_cache, prefill))
        return out

    def _prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefill: PrefillBatch):
        return ops.paged_prefill(q, k_cache, v_cache, prefill.page_table, prefill.query_starts, prefill.context_lens,
                                 self.pool.page_size)
