"""Decode on CUDA: the Triton kernel (attention/triton_decode.py) walks each row's page table in place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve.attention.backends.base import DecodeBackend, move_together, padded_page_table


@dataclass(frozen=True)
class PageTableMetadata:
    page_table: torch.Tensor
    """[rows, most_pages] int32 page ids, padded with 0."""
    context_lens: torch.Tensor
    """[rows] int32 tokens to attend to (the new one included)."""


class TritonDecode(DecodeBackend[PageTableMetadata]):
    name = "triton"

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda"

    def __init__(self, page_size: int, device: torch.device) -> None:
        super().__init__(page_size, device)
        from omniserve.attention.triton_decode import paged_decode_attention  # triton is imported only when used

        self._kernel = paged_decode_attention

    def build_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> PageTableMetadata:
        table = padded_page_table(page_ids, torch.int32)
        lens = torch.tensor(context_lens, dtype=torch.int32)
        return PageTableMetadata(*move_together([table, lens], self.device))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PageTableMetadata
               ) -> torch.Tensor:
        return self._kernel(q, k_cache, v_cache, metadata.page_table, metadata.context_lens, self.page_size)
