"""The CUDA paths end to end: bf16/fp32 engine on the GPU, the Triton decode kernel inside the engine, and
piggybacking with the asynchronous swap-out and row sends (pinned buffers, side stream, events). Skipped without
a GPU; the same behaviours are tested on the CPU elsewhere."""

from __future__ import annotations

import pytest
import torch

from omniserve.sampling.params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29, [42, 43]]


def greedy(service_class="ls"):
    return SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, service_class=service_class)


def test_cuda_engine_matches_cpu_engine(tiny_model_dirs, make_llm):
    folder = tiny_model_dirs["llama"][0]
    cpu = make_llm(folder, device="cpu", dtype="float32", be_decode_placement="device")
    cuda = make_llm(folder, device="cuda", dtype="float32", be_decode_placement="device")
    expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, greedy(), use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in cuda.generate(PROMPTS, greedy(), use_tqdm=False)] == expected


def test_cuda_engine_decodes_with_the_triton_backend(tiny_model_dirs, make_llm):
    from omniserve.attention.backends import TritonDecode

    llm = make_llm(tiny_model_dirs["llama"][0], device="cuda", dtype="float32")
    assert isinstance(llm.engine.runner.attention.decode_backend, TritonDecode)


@pytest.mark.parametrize("pipeline", ["multi-layer", "one-layer", "sync"])
def test_cuda_piggybacking_gives_device_tokens(tiny_model_dirs, make_llm, pipeline):
    """`sync` makes the device wait for every layer's rows: the rows go to the pool through pinned copies that the
    inbox threads wait for, and come back within the iteration."""
    folder = tiny_model_dirs["llama"][0]
    device = make_llm(folder, device="cuda", dtype="float32", be_decode_placement="device")
    expected = [o.outputs[0].token_ids for o in device.generate(PROMPTS, greedy(), use_tqdm=False)]
    offloading = make_llm(folder, device="cuda", dtype="float32", be_decode_placement="cpu",
                          offload_pipeline=pipeline)
    params = [greedy("be" if i % 2 == 0 else "ls") for i in range(len(PROMPTS))]
    assert [o.outputs[0].token_ids for o in offloading.generate(PROMPTS, params, use_tqdm=False)] == expected
    assert offloading.engine.scheduler.stats.num_swap_outs == 3


def test_bf16_default_model_on_cuda(make_llm):
    llm = make_llm(max_model_len=1024)
    assert llm.engine.dtype == torch.bfloat16
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
