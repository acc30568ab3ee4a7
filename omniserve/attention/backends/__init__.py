"""Decode-attention backends: one module per kernel, each owning the metadata its kernel reads.

The backend is chosen once per PagedAttention, by what the device supports; the first row of DECODE_BACKENDS that
supports the device and the KV dtype wins:

    TritonDecode        CUDA                                  page tables, walked in place (triton_paged.py)
    CompiledCPUDecode   CPU, kernel built                     flat slot lists, read in place (compiled_cpu.py)
    TorchGatherDecode   anything                              gathered, padded and masked (torch_gather.py)

A new kernel is a module with a DecodeBackend subclass (its `supports`, metadata and `attend`) and a row here.
"""

from __future__ import annotations

import functools
import logging

import torch

from omniserve.attention.backends.base import DecodeBackend
from omniserve.attention.backends.compiled_cpu import CompiledCPUDecode
from omniserve.attention.backends.torch_gather import TorchGatherDecode
from omniserve.attention.backends.triton_paged import TritonDecode

logger = logging.getLogger(__name__)

DECODE_BACKENDS: tuple[type[DecodeBackend], ...] = (TritonDecode, CompiledCPUDecode, TorchGatherDecode)
"""In order of preference; the last supports every device."""


def select_decode_backend(device: torch.device, dtype: torch.dtype, page_size: int) -> DecodeBackend:
    """The first backend of DECODE_BACKENDS that supports `device` and `dtype`, over pages of page_size tokens."""
    backend = next(b for b in DECODE_BACKENDS if b.supports(device, dtype))
    _log_choice(backend.name, device.type, dtype)
    return backend(page_size, device)


@functools.cache
def _log_choice(name: str, device_type: str, dtype: torch.dtype) -> None:
    """Once per process and choice: the profiler builds many PagedAttentions."""
    logger.info("decode attention on %s in %s: the %s backend", device_type, str(dtype).removeprefix("torch."), name)


__all__ = ["DECODE_BACKENDS", "CompiledCPUDecode", "DecodeBackend", "TorchGatherDecode", "TritonDecode",
           "select_decode_backend"]
