"""A decode step of the GPU code path, run on the meta device: what it launches and when it waits, at any model's
shapes, on any machine.

On the meta device every op computes shapes only, so a whole Llama-3-8B step runs in milliseconds with no GPU and
no weights. It follows the CUDA path (the decode backend for meta is the CUDA one: ops/, attention/backends/), so:

- its ops, counted with a dispatch mode, are the kernels a GPU step launches (views and allocations, which launch
  none, are not counted); per layer is the difference between a step of 2L and one of L layers, divided by L;
- a wait for the device (`.item()`, `.tolist()`, a branch on a device value, a data-dependent shape) cannot run on
  meta tensors and fails the step, except the sampler's one copy out (ops.transfer.to_host), which is counted;
- copies from the host are counted (on a GPU, what the step moves in).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omniserve.config import ModelConfig
from omniserve.engine.runner import ModelRunner
from omniserve.engine.scheduler.plan import IterationPlan, ScheduledChunk
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.hf_config import config_from_hf
from omniserve.models.llama import LlamaForCausalLM
from omniserve.models.presets import PRESETS
from omniserve.ops import transfer
from omniserve.sampling.params import SamplingParams

_META = torch.device("meta")
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh"}
"""Ops that allocate or relabel without a kernel."""


@dataclass(frozen=True)
class StepOps:
    ops: int
    """Ops that launch a kernel in the step."""
    host_copies: int
    """Copies from the host into the device."""
    device_waits: int
    """Copies back to the host (ops.transfer.to_host)."""
    names: tuple[str, ...]
    """The ops, in order."""


class _Counter(TorchDispatchMode):
    """Ops on the device (any tensor in or out on meta) that launch a kernel, and copies from the host; host-side
    ops (building indexes from lists) are the engine thread's work, not the device's."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.host_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        devices = {t.device.type for t in _tensors(args) + _tensors(out)}
        if "meta" not in devices:
            return out
        if name in ("to", "_to_copy", "copy_") and "cpu" in devices:
            self.host_copies += 1
        elif not (func.is_view or name in _NO_LAUNCH):
            self.names.append(f"{func.namespace}.{name}")
        return out


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    config = config_from_hf(PRESETS[name])
    return config if num_layers is None else replace(config, num_layers=num_layers)


def decode_plan(batch: int, context: int, page_size: int, params: list[SamplingParams] | None = None
                ) -> IterationPlan:
    """`batch` requests (greedy unless `params` says) each decoding its token at position `context`, pages back to
    back."""
    pages = -(-(context + 1) // page_size)
    params = params or [SamplingParams(temperature=0.0)] * batch
    return IterationPlan(chunks=[
        ScheduledChunk(str(i), [1], context, list(range(i * pages, (i + 1) * pages)), True, params[i], 1)
        for i in range(batch)
    ])


@torch.inference_mode()
def meta_step(config: ModelConfig, batch: int, context: int, dtype: torch.dtype = torch.bfloat16,
              page_size: int = 16, params: list[SamplingParams] | None = None) -> StepOps:
    """Runs one decode step of `batch` rows at `context` on the meta device; see the module docstring. (A seeded row
    cannot run there: the meta device has no random generator.)"""
    with _META:
        model = LlamaForCausalLM(config, max_positions=context + 1).to(dtype)
    pages = batch * -(-(context + 1) // page_size)
    runner = ModelRunner(model, PagePool(config, pages, page_size, _META, dtype), _META)
    waits = []

    def to_host(values: torch.Tensor) -> list:
        waits.append(values.shape)
        return torch.zeros(values.shape).tolist()

    counter = _Counter()
    with mock.patch.object(transfer, "to_host", to_host), counter:
        output = runner.execute(decode_plan(batch, context, page_size, params))
    assert len(output.sampled) == batch
    return StepOps(len(counter.names), counter.host_copies, len(waits), tuple(counter.names))


def ops_per_layer(config: ModelConfig, batch: int, context: int, layers: int = 2) -> tuple[float, StepOps]:
    """(ops per layer of a decode step, the step at `layers` layers): from steps of `layers` and 2 x `layers`."""
    small = meta_step(replace(config, num_layers=layers), batch, context)
    large = meta_step(replace(config, num_layers=2 * layers), batch, context)
    return (large.ops - small.ops) / layers, small
