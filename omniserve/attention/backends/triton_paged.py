"""Decode on CUDA: the Triton kernel (attention/triton_decode.py) walks each row's page table in place. It is the
operator omniserve::paged_decode (ops/), which also runs on the meta device: a step of the CUDA path can be run there,
shapes only, to count its ops and check it never waits for the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve import ops
from omniserve.attention.backends.base import DecodeBackend, padded_page_table
from omniserve.ops.transfer import long_tensor


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
        return device.type in ("cuda", "meta")

    def host_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> list[torch.Tensor]:
        return [padded_page_table(page_ids, torch.long), long_tensor(context_lens)]

    def metadata(self, moved: list[torch.Tensor]) -> PageTableMetadata:
        return PageTableMetadata(*moved)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PageTableMetadata
               ) -> torch.Tensor:
        return ops.paged_decode(q, k_cache, v_cache, metadata.page_table, metadata.context_lens, self.page_size)
