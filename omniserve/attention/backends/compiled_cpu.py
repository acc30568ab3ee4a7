"""Decode on a CPU device: the compiled kernel of the CPU attention workers (cpu_attention/csrc), whose paged entry
point reads each row's slots in place from one flat list, only where the kernel was built. A bf16 or fp16 pool is
computed in fp32, each tile converted as the kernel reads it (3x the speed of gathering and converting the context
first: BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve.attention.backends.base import DecodeBackend, padded_slots
from omniserve.ops.transfer import long_tensor
from omniserve.cpu_attention.kernel import compiled_kernel


@dataclass(frozen=True)
class FlatSlotsMetadata:
    flat_slots: torch.Tensor
    """[total context] int64: each row's slots back to back."""
    offsets: torch.Tensor
    """[rows + 1] int64: row r's slots are flat_slots[offsets[r]:offsets[r + 1]]."""


class CompiledCPUDecode(DecodeBackend[FlatSlotsMetadata]):
    name = "compiled CPU kernel"

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype.is_floating_point and compiled_kernel() is not None

    def __init__(self, page_size: int, device: torch.device) -> None:
        super().__init__(page_size, device)
        self.kernel = compiled_kernel()

    def host_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> list[torch.Tensor]:
        slots, valid = padded_slots(page_ids, context_lens, self.page_size)
        offsets = torch.zeros(len(context_lens) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(long_tensor(context_lens), 0)
        return [slots[valid], offsets]

    def metadata(self, moved: list[torch.Tensor]) -> FlatSlotsMetadata:
        return FlatSlotsMetadata(*moved)  # the device is the host: the "copy" moved nothing

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: FlatSlotsMetadata
               ) -> torch.Tensor:
        return self.kernel.paged_decode_attention(q, k_cache, v_cache, metadata.flat_slots, metadata.offsets)
