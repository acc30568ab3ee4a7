"""What every decode backend is, and the host-side helpers they build their metadata with.

A decode backend is one kernel for the decode rows of an iteration (one new token per request, attending to the
request's KV in the page pool) together with the metadata that kernel reads. The metadata is built once per
iteration on the host from plain lists (host_metadata: int64 tensors), and moved to the device in the iteration's
one copy, beside the runner's other inputs (attention/paged.py); a copy per request would cost a host-to-device
round trip each on a GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar

import torch

from omniserve.ops.transfer import long_tensor

Metadata = TypeVar("Metadata")


class DecodeBackend(ABC, Generic[Metadata]):
    """A decode kernel over a page pool of `page_size` tokens per page on `device`, and the metadata it reads."""

    name: ClassVar[str]
    """How the choice is logged."""

    def __init__(self, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.device = device

    @classmethod
    @abstractmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this kernel runs on `device` over KV of `dtype` (imports nothing the device lacks)."""

    @abstractmethod
    def host_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> list[torch.Tensor]:
        """The metadata of the decode rows as int64 host tensors: row r attends to the first context_lens[r] tokens
        (its new one included) of the request whose pages are page_ids[r]."""

    @abstractmethod
    def metadata(self, moved: list[torch.Tensor]) -> Metadata:
        """The metadata from host_metadata's tensors, now on the device."""

    def build_metadata(self, page_ids: Sequence[Sequence[int]], context_lens: Sequence[int]) -> Metadata:
        """host_metadata, then metadata, with a copy of its own."""
        return self.metadata(move_together(self.host_metadata(page_ids, context_lens), self.device))

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: Metadata
               ) -> torch.Tensor:
        """q: [rows, num_heads, head_dim]; k_cache, v_cache: [slots, num_kv_heads, head_dim] (one layer of the
        pool). Returns [rows, num_heads, head_dim]."""


def move_together(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors of one dtype moved to `device` in one copy; returned in their shapes, as contiguous views of the
    one buffer that arrived. On a GPU the copy goes through pinned memory: from pageable memory it would wait for
    every kernel queued before it."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    moved = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return [part.view(t.shape) for part, t in zip(moved.split([t.numel() for t in tensors]), tensors)]


def padded_page_table(page_ids: Sequence[Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
    """[rows, most_pages] page ids on the host, padded with page 0 (built in an array: see long_tensor)."""
    most_pages = max((len(pages) for pages in page_ids), default=0)
    flat = array("q")
    for pages in page_ids:
        flat.extend(pages)
        flat.extend([0] * (most_pages - len(pages)))
    return long_tensor(flat).view(len(page_ids), most_pages).to(dtype)


def padded_slots(page_ids: Sequence[Sequence[int]], context_lens: Sequence[int], page_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """On the host: the slots of every row's context, [rows, longest_context] int64 (past a row's end: whatever its
    padded page table gives), and which of them are real, [rows, longest_context] bool."""
    table = padded_page_table(page_ids, torch.long)
    positions = torch.arange(max(context_lens))
    valid = positions.unsqueeze(0) < torch.tensor(context_lens).unsqueeze(1)
    return table[:, positions // page_size] * page_size + positions % page_size, valid
