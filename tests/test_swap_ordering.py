"""The swap-out's ordering on CUDA, made explicit: the device-to-host copy runs on a side stream, and until its event
completes the runner keeps the device tensors it reads (and marks them in use by that stream), and the request is
not reported swapped out. Checked on the CPU with the copy's start replaced by a stand-in whose event we complete."""

from __future__ import annotations

import torch

from omniserve.config import ModelConfig
from omniserve.engine.runner import ModelRunner
from omniserve.engine.scheduler.plan import KVTransfer
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.llama import LlamaForCausalLM


class _Event:
    def __init__(self) -> None:
        self.completed = False

    def query(self) -> bool:
        return self.completed


class _HostPool:
    def __init__(self) -> None:
        self.loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self, request_id, k, v, final_tokens, prefix_pages=()) -> None:
        self.loaded[request_id] = (k, v)


def test_a_swap_out_holds_its_sources_until_the_copy_completes_and_only_then_reports_it():
    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=16)
    pool = PagePool(config, num_pages=4, page_size=4, device=torch.device("cpu"), dtype=torch.float32)
    for layer in pool.k + pool.v:
        layer.copy_(torch.randn(layer.shape))
    runner = ModelRunner(LlamaForCausalLM(config, max_positions=16), pool, torch.device("cpu"), _HostPool())
    runner._copy_stream = object()  # the CUDA path: copies complete in a later iteration
    started = []

    def start_host_copy(k, v):
        event = _Event()
        started.append((k, v, event))
        return k.clone(), v.clone(), event

    runner._start_host_copy = start_host_copy
    assert runner._swap_out([KVTransfer("r", [2, 0], 6)]) == []  # the copy is under way: not reported
    (k, v, event), = started
    assert runner._copies[0].sources[0] is k and runner._copies[0].sources[1] is v  # held while it reads them
    assert runner._swap_out([]) == []
    event.completed = True
    assert runner._swap_out([]) == ["r"]
    assert runner._copies == []  # the sources are let go once the copy is whole
    expected_k, _ = pool.gather([2, 0], 6)
    assert torch.equal(runner.cpu_pool.loaded["r"][0], expected_k)
