"""The physical KV page pool: device tensors only, no bookkeeping."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import time
from collections.abc import Sequence

import torch

from omniserve import ops
from omniserve.config import CPU_DEFAULT_KV_BYTES, CacheConfig, ConfigError, ModelConfig

logger = logging.getLogger(__name__)

_CUDA_FREE_MEMORY_FRACTION = 0.9
_GIB = 2**30


class PagePool:
    """K and V pages for every layer.

    Per layer, k[layer] and v[layer] are [num_pages * page_size, num_kv_heads, head_dim]: token slot
    `page * page_size + offset` holds one token's key (or value). Flat slots make a write one indexed copy.
    """

    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype,
                 pin_memory: bool = False, shared: bool = False):
        """pin_memory: host pages a GPU copies to and from (the prefix cache's host tier beside a CUDA pool).
        shared: host pages in shared memory, which the CPU pool's worker processes read in place (the host tier)."""
        self.num_pages = num_pages
        self.page_size = page_size
        self.page_bytes = bytes_per_page(model, page_size, dtype)
        """One page's K and V, every layer."""
        self._releasable = device.type == "cpu" and not pin_memory  # see release_memory
        self._shared = shared
        shape = (num_pages * page_size, model.num_kv_heads, model.head_dim)
        if shared:
            self.k = [_shared_empty(shape, dtype, pin_memory) for _ in range(model.num_layers)]
            self.v = [_shared_empty(shape, dtype, pin_memory) for _ in range(model.num_layers)]
            return
        # torch.empty: pages are written before they are read, and untouched host memory is never committed.
        self.k = [torch.empty(shape, device=device, dtype=dtype, pin_memory=pin_memory)
                  for _ in range(model.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype, pin_memory=pin_memory)
                  for _ in range(model.num_layers)]

    def copy_pages(self, pairs: list[tuple[int, int]], to: PagePool) -> None:
        """Copies whole pages, every layer, from this pool to another (the device's and the prefix cache's host
        tier): (page here, page there) pairs."""
        if not pairs:
            return
        here = token_slots([a for a, _ in pairs], 0, len(pairs) * self.page_size, self.page_size)
        there = token_slots([b for _, b in pairs], 0, len(pairs) * self.page_size, self.page_size)
        here, there = here.to(self.k[0].device), there.to(to.k[0].device)
        for source, target in ((self.k, to.k), (self.v, to.v)):
            for layer in range(len(source)):
                target[layer].index_copy_(0, there, source[layer].index_select(0, here).to(target[layer].device))

    def release_memory(self, pages: Sequence[int]) -> None:
        """Gives the host memory of these pages back to the OS (their contents are lost; the next write commits it
        again): what the host tier evicts when it gives way to offloaded KV. Whole OS pages inside each run of
        consecutive pages only; nothing for a GPU's memory, or pinned memory (CUDA keeps it locked)."""
        if not self._releasable or not pages:
            return
        advice = _MADV_REMOVE if self._shared else _MADV_DONTNEED  # shared memory is a file: punch the hole
        runs, ordered = [], sorted(pages)
        for page in ordered:
            if runs and runs[-1][1] == page:
                runs[-1][1] = page + 1
            else:
                runs.append([page, page + 1])
        for tensor in self.k + self.v:
            page_bytes = self.page_size * tensor.stride(0) * tensor.element_size()
            for first, end in runs:
                start = tensor.data_ptr() + first * page_bytes
                aligned = -(-start // _OS_PAGE) * _OS_PAGE
                length = (start + (end - first) * page_bytes - aligned) // _OS_PAGE * _OS_PAGE
                if length > 0:
                    _libc().madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), advice)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [num_tokens, num_kv_heads, head_dim] at `slots` [num_tokens] (int64; a negative slot: that row
        is not stored). One operator for both (ops.store_kv)."""
        ops.store_kv(k, v, self.k[layer], self.v[layer], slots)

    def gather(self, page_ids: Sequence[int], num_tokens: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the K and V of positions start .. num_tokens-1 of the request whose pages are page_ids, from
        every layer: each [num_layers, num_tokens - start, num_kv_heads, head_dim], on the pool's device (swap-out)."""
        slots = token_slots(page_ids, start, num_tokens - start, self.page_size).to(self.k[0].device)
        return (torch.stack([layer.index_select(0, slots) for layer in self.k]),
                torch.stack([layer.index_select(0, slots) for layer in self.v]))

    def scatter(self, page_ids: Sequence[int], num_tokens: int, k: torch.Tensor, v: torch.Tensor,
                start: int = 0) -> None:
        """The inverse of gather (swap-in): stores k, v [num_layers, num_tokens, num_kv_heads, head_dim], wherever
        they are and in whatever dtype (the CPU attention workers keep a bf16 pool's KV in fp32), as the first
        num_tokens tokens of the request whose pages are page_ids; the first `start` of them are there already (pages
        found in the prefix cache) and are skipped."""
        slots = token_slots(page_ids, start, num_tokens - start, self.page_size).to(self.k[0].device)
        to = dict(device=slots.device, dtype=self.k[0].dtype)
        for layer in range(len(self.k)):
            # Layer by layer: a whole request's KV moved at once would need that much spare device memory.
            self.write(layer, slots, k[layer, start:].to(**to), v[layer, start:].to(**to))


_OS_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED, _MADV_REMOVE = 4, 9  # Linux's values (asm-generic/mman-common.h)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """An uninitialised host tensor in shared memory (created there: nothing is copied, so untouched pages stay
    uncommitted), pinned for a GPU's copies where CUDA lets it register the memory (else left pageable: copies still
    work, only slower)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    tensor = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    if pin_memory:
        try:
            error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), storage.nbytes(), 0))
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation: any failure leaves pageable memory
            error = exc
        if error != 0:
            logger.warning("could not pin the shared host tier (%s): its copies run from pageable memory", error)
    return tensor


def copy_bandwidth(device: torch.device, nbytes: int = 32 << 20, repeats: int = 3) -> float:
    """Bytes/s of a copy from (pinned, beside a GPU) host memory to `device`: the best of a few of nbytes each."""
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / max(best, 1e-9)


def token_slots(page_ids: Sequence[int], start: int, count: int, page_size: int) -> torch.Tensor:
    """[count] int64 on the host: the slots of positions start .. start+count-1 of a request whose pages are
    page_ids."""
    positions = torch.arange(start, start + count)
    pages = torch.tensor(page_ids, dtype=torch.long)
    return pages[positions // page_size] * page_size + positions % page_size


def bytes_per_page(model: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * page_size * model.kv_size * torch.empty((), dtype=dtype).element_size()


def pages_for_memory(model: ModelConfig, cache: CacheConfig, device: torch.device, dtype: torch.dtype,
                     weights: int = 0, activations: int = 0) -> int:
    """How many pages the configured (or default) KV memory holds. An exact page count wins, then a KV size in bytes,
    then a memory utilization: the KV cache gets what its share of the memory budget leaves beside the loaded
    `weights` and the `activations` peak (bytes: weight_bytes, activation_peak_bytes)."""
    if cache.num_pages is not None:
        return cache.num_pages
    budget = cache.kv_cache_memory_bytes
    if budget is None and cache.gpu_memory_utilization is not None:
        budget = _kv_bytes_for_utilization(cache.gpu_memory_utilization, device, weights, activations,
                                           bytes_per_page(model, cache.page_size, dtype))
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * _CUDA_FREE_MEMORY_FRACTION)
        else:
            budget = CPU_DEFAULT_KV_BYTES
    return max(1, budget // bytes_per_page(model, cache.page_size, dtype))


def memory_budget_bytes(device: torch.device, weights: int) -> tuple[int, str]:
    """(bytes, what they are) that --gpu-memory-utilization takes its share of: the device's whole memory on CUDA
    (as in vLLM); on the CPU, the memory available to the engine at start-up: what the system has available now
    (MemAvailable) and what the engine's loaded `weights` took of it."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total, f"the memory of {torch.cuda.get_device_name(device)}"
    from omniserve.cpu_attention.remote import available_memory_bytes

    return available_memory_bytes() + weights, "the memory available at start-up"


def _kv_bytes_for_utilization(utilization: float, device: torch.device, weights: int, activations: int,
                              page_bytes: int) -> int:
    """The KV cache's bytes: `utilization` of the memory budget, less the weights and the activation peak; a
    ConfigError, with the numbers, when that leaves no room for a page."""
    total, what = memory_budget_bytes(device, weights)
    share = int(total * utilization)
    kv_bytes = share - weights - activations
    if kv_bytes < page_bytes:
        raise ConfigError(
            f"gpu_memory_utilization {utilization} leaves no room for the KV cache: {utilization} of {what} "
            f"({total / _GIB:.2f} GiB) is {share / _GIB:.2f} GiB, and the weights take {weights / _GIB:.2f} GiB "
            f"and the activation peak {activations / _GIB:.2f} GiB of it (a KV page needs {page_bytes} bytes); "
            "raise it, or size the KV cache with kv_cache_memory_bytes or num_gpu_blocks_override")
    logger.info("KV cache: %.2f GiB, what %s of %s (%.2f GiB) leaves beside %.2f GiB of weights and a %.2f GiB "
                "activation peak", kv_bytes / _GIB, utilization, what, total / _GIB, weights / _GIB,
                activations / _GIB)
    return kv_bytes


def weight_bytes(model: torch.nn.Module) -> int:
    """What the model's weights (and buffers) take, as loaded, with the copies the CPU's GEMM keeps of some
    (models/linear.py's pack_for_onednn)."""
    from omniserve.models.linear import PACKED

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [packed for t in tensors if (packed := getattr(t, PACKED, None)) is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_peak_bytes(config: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int,
                          max_model_len: int) -> int:
    """An upper estimate of one iteration's activation peak. Layers run one at a time, so the peak is one layer's:
    the batch's hidden states and residual, QKV, attention output and MLP (gate, up, their product), a prefill
    chunk's attention scores over the longest context with that context's K and V gathered; and then the sampled
    rows' fp32 logits, with a copy for sampling."""
    rows, element = max_num_batched_tokens, torch.empty((), dtype=dtype).element_size()
    layer = rows * (2 * config.hidden_size + 2 * config.q_size + 2 * config.kv_size + 3 * config.intermediate_size)
    scores = config.num_heads * rows * max_model_len + 2 * max_model_len * config.kv_size
    logits = 2 * max_num_seqs * config.vocab_size * 4
    return (layer + scores) * element + logits
