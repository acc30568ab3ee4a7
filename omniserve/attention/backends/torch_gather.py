"""Decode anywhere, in plain torch: each row's keys and values are gathered to [rows, longest context] and padded
positions are masked out. Used where no kernel runs (a CPU without a compiler)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve.attention.backends.base import DecodeBackend, padded_slots
from omniserve.ops.transfer import long_tensor
from omniserve.ops.reference import attend_slots


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

    def host_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> list[torch.Tensor]:
        slots, valid = padded_slots(page_ids, context_lens, self.page_size)
        # Padding must point at written KV: masked scores still see the keys, and a never-written slot may hold
        # NaN bit patterns that survive the mask (NaN + -inf is NaN). Each row's position 0 is always written.
        slots = torch.where(valid, slots, slots[:, :1])
        return [slots, long_tensor(context_lens)]

    def metadata(self, moved: list[torch.Tensor]) -> PaddedSlotsMetadata:
        slots, lens = moved
        mask = torch.arange(slots.shape[1], device=slots.device).unsqueeze(0) < lens.unsqueeze(1)
        return PaddedSlotsMetadata(slots, mask.view(len(lens), 1, 1, -1))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PaddedSlotsMetadata
               ) -> torch.Tensor:
        return attend_slots(q, k_cache, v_cache, metadata.slots, metadata.mask)
