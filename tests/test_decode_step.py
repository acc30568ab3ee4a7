"""A decode step of the GPU code path, run on the meta device at Llama-3-8B's shapes (omniserve.bench.step_ops):
the kernels it launches per layer, its copies in, and its waits for the device: exactly one, the sampled ids. On meta tensors any
other wait (.item(), .tolist(), a branch on a device value) cannot run, so a new one fails these tests."""

from __future__ import annotations

import pytest

from omniserve.bench.step_ops import meta_step, ops_per_layer, preset_config
from omniserve.sampling.params import SamplingParams

LAYER_OPS_LIMIT = 12  # the goal; the layer is 10: 2 norms, 4 GEMMs, RoPE, KV store, attention, SiLU x mul


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_decode_layer_launches_at_most_twelve_ops(batch):
    per_layer, step = ops_per_layer(preset_config("llama-3-8b"), batch, context=1024)
    assert per_layer <= LAYER_OPS_LIMIT, step.names
    assert step.device_waits == 1
    # In: the token ids, positions, attention indexes and the decode kernel's page tables, in one copy.
    assert step.host_copies == 1


def test_the_only_wait_for_the_device_is_the_sampled_ids_also_with_logprobs_and_random_rows():
    rows = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.8, top_p=0.9, min_p=0.1),
            SamplingParams(temperature=0.7, top_k=20, min_tokens=4, stop_token_ids=[7]),
            SamplingParams(temperature=0.0, logprobs=0)]
    step = meta_step(preset_config("llama-3-8b", num_layers=2), len(rows), 100, params=rows)
    assert step.device_waits == 1
