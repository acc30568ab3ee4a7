"""How big the KV cache is: --gpu-memory-utilization as vLLM means it (the share of the memory budget that the weights,
the activations and the KV cache take together; on the CPU, the memory available at start-up), the flags that win
over it, the default without any, and the clear errors of a share out of range or one that leaves no room for KV."""

from __future__ import annotations

import pytest

from omniserve.config import CPU_DEFAULT_KV_BYTES, ConfigError
from omniserve.cpu_attention import remote
from omniserve.entrypoints.cli import main
from omniserve.kv_cache.page_pool import activation_peak_bytes, bytes_per_page, weight_bytes

AVAILABLE = 1 << 30
"""What the system has available, as these tests make the engine see it."""


@pytest.fixture
def available(monkeypatch) -> int:
    monkeypatch.setattr(remote, "available_memory_bytes", lambda: AVAILABLE)
    return AVAILABLE


def page_bytes(engine) -> int:
    return bytes_per_page(engine.model_config, engine.page_table.page_size, engine.dtype)


def engine_bytes(engine) -> tuple[int, int]:
    """(weights, activation peak) as the engine counts them."""
    config = engine.scheduler_config
    return weight_bytes(engine.runner.model), activation_peak_bytes(
        engine.model_config, engine.dtype, config.max_num_batched_tokens, config.max_num_seqs, config.max_model_len)


def test_the_kv_cache_gets_what_the_share_leaves_beside_weights_and_activations(tiny_model_dirs, make_llm, available):
    tiny, pages = tiny_model_dirs["llama"][0], {}
    for share in (0.25, 0.5):
        engine = make_llm(tiny, block_size=4, gpu_memory_utilization=share).engine
        weights, activations = engine_bytes(engine)
        budget = available + weights  # what was available before the weights loaded
        assert engine.allocator.num_pages == (int(budget * share) - weights - activations) // page_bytes(engine)
        pages[share] = engine.allocator.num_pages
    # A quarter of the budget more is a quarter of the budget more KV (within a page's rounding).
    assert abs((pages[0.5] - pages[0.25]) * page_bytes(engine) - (available + weights) / 4) <= 2 * page_bytes(engine)


def test_an_exact_kv_size_or_page_count_wins_over_the_share(tiny_model_dirs, make_llm, available):
    tiny = tiny_model_dirs["llama"][0]
    engine = make_llm(tiny, block_size=4, gpu_memory_utilization=0.5, kv_cache_memory_bytes=1 << 20).engine
    assert engine.allocator.num_pages == (1 << 20) // page_bytes(engine)
    engine = make_llm(tiny, block_size=4, gpu_memory_utilization=0.5, num_gpu_blocks_override=37).engine
    assert engine.allocator.num_pages == 37


def test_without_the_flag_the_cpu_kv_cache_keeps_its_default_size(tiny_model_dirs, make_llm):
    engine = make_llm(tiny_model_dirs["llama"][0], block_size=4).engine
    assert engine.allocator.num_pages == CPU_DEFAULT_KV_BYTES // page_bytes(engine)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_an_error_before_the_model_loads(share):
    from omniserve.engine.llm_engine import LLMEngine

    with pytest.raises(ConfigError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        LLMEngine(model="/no/such/model", gpu_memory_utilization=share)  # a model that would fail to load


def test_a_share_that_leaves_no_room_for_kv_names_the_numbers(tiny_model_dirs, monkeypatch):
    from omniserve.engine.llm_engine import LLMEngine

    monkeypatch.setattr(remote, "available_memory_bytes", lambda: 0)  # the weights are all there was
    with pytest.raises(ConfigError) as error:
        LLMEngine(model=tiny_model_dirs["llama"][0], block_size=4, gpu_memory_utilization=0.5)
    message = str(error.value)
    assert "gpu_memory_utilization 0.5 leaves no room for the KV cache" in message
    assert "the memory available at start-up" in message and "the weights take" in message
    assert "activation peak" in message and "kv_cache_memory_bytes" in message


def test_the_cli_takes_the_flag_and_says_what_is_wrong_with_it(capsys):
    with pytest.raises(SystemExit, match=r"omniserve: error: gpu_memory_utilization must be in \(0, 1\], got 2.0"):
        main(["generate", "hi", "--model", "/no/such/model", "--gpu-memory-utilization", "2"])
