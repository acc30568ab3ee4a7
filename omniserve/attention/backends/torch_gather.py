"""Decode anywhere, in plain torch: each row's keys and values are gathered to [rows, longest context] and padded
positions are masked out. Used where no kernel runs (bf16 on the CPU, a CPU without a compiler)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniserve.attention.backends.base import DecodeBackend, move_together, padded_slots


@dataclass(frozen=True)
class PaddedSlotsMetadata:
    slots: torch.Tensor
    """[rows, longest_context] int64 KV slots to attend to, padded with the row's first slot."""
    mask: torch.Tensor
    """[rows, 1, 1, longest_context] bool: True for real positions."""


class TorchGatherDecode(DecodeBackend[PaddedSlotsMetadata]):
    name = "torch"

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def build_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> PaddedSlotsMetadata:
        slots, valid = padded_slots(page_ids, context_lens, self.page_size)
        # Padding must point at written KV: masked scores still see the keys, and a never-written slot may hold
        # NaN bit patterns that survive the mask (NaN + -inf is NaN). Each row's position 0 is always written.
        slots = torch.where(valid, slots, slots[:, :1])
        slots, lens = move_together([slots, torch.tensor(context_lens, dtype=torch.long)], self.device)
        mask = torch.arange(slots.shape[1], device=self.device).unsqueeze(0) < lens.unsqueeze(1)
        return PaddedSlotsMetadata(slots, mask.view(len(context_lens), 1, 1, -1))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PaddedSlotsMetadata
               ) -> torch.Tensor:
        rows, heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        # GQA without copies: the query heads sharing a KV head take the place of SDPA's query-length axis.
        grouped_q = q.view(rows, kv_heads, heads // kv_heads, head_dim)
        slots = metadata.slots.view(-1)  # index_select: several times faster than advanced indexing on the CPU
        keys = k_cache.index_select(0, slots).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, slots).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=metadata.mask)
        return attended.reshape(rows, heads, head_dim)
