"""LS SLOs from a latency model, as `omniserve bench --compare` and the policy benchmark set them.

TPOT SLO = a factor x a lone LS decode step. TTFT SLO = a factor x the time to prefill the longest LS prompt next to
one LS decode, in chunks that each fit an iteration budget (what the SLO-aware scheduler does): `budgeted_prefill`.

The latency model comes from the profile cache, under the key the servers will look up: `latency_model_for` loads
the model and calls load_or_profile with the settings an engine of the same EngineArgs would use (`profile_settings`),
without building an engine.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from omniserve.bench.metrics import Slo
from omniserve.engine.args import EngineArgs
from omniserve.engine.scheduler.latency_model import LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.plan import ScheduledChunk
from omniserve.engine.scheduler.policy import offload_mode
from omniserve.sampling.params import SamplingParams

if TYPE_CHECKING:
    from omniserve.cpu_attention import PoolConfig

_GREEDY = SamplingParams(temperature=0.0)


def latency_chunk(num_tokens: int, start_position: int, sample: bool) -> ScheduledChunk:
    """A chunk of `num_tokens` tokens from `start_position`, as the latency model reads it (a count, a start and
    whether it samples: see batch_shape_of_chunks); one token is a decode row."""
    return ScheduledChunk("slo", [0] * num_tokens, start_position, [], sample, _GREEDY, 0)


def iteration_time(latency: LatencyModel, chunks: list[ScheduledChunk]) -> float:
    """Seconds the latency model predicts for one iteration of these device chunks."""
    return latency.iteration_time(batch_shape_of_chunks(chunks))


def three_quarters(count: int) -> int:
    return max(1, count * 3 // 4)


def budgeted_prefill(chunk_time: Callable[[int, int], float], prompt_len: int, max_chunk: int, limit: float,
                     shrink: Callable[[int], int] = three_quarters) -> list[tuple[int, float]]:
    """(tokens, seconds) of each chunk that prefills a `prompt_len`-token prompt: from `max_chunk` tokens (or what is
    left), shrunk by `shrink` until `chunk_time(start, tokens)` fits `limit`; a single token always goes."""
    chunks, start = [], 0
    while start < prompt_len:
        count = min(prompt_len - start, max_chunk)
        while count > 1 and chunk_time(start, count) > limit:
            count = shrink(count)
        chunks.append((count, chunk_time(start, count)))
        start += count
    return chunks


def slos_from_latency(latency: LatencyModel, max_prompt: int, max_num_batched_tokens: int, budget_share: float,
                      tpot_factor: float, ttft_factor: float) -> Slo:
    """TPOT SLO = tpot_factor x a lone decode at context max_prompt + 1; TTFT SLO = ttft_factor x the prefill of a
    max_prompt-token prompt next to that decode, in chunks that each fit budget_share x the TPOT SLO (the share of it
    the scheduler plans an iteration to fill)."""
    decode = latency_chunk(1, max_prompt, True)
    tpot = tpot_factor * iteration_time(latency, [decode])

    def chunk_time(start: int, count: int) -> float:
        return iteration_time(latency, [decode, latency_chunk(count, start, True)])

    prefill = budgeted_prefill(chunk_time, max_prompt, max_num_batched_tokens, budget_share * tpot)
    return Slo(ttft=ttft_factor * sum(seconds for _, seconds in prefill), tpot=tpot)


# ------------------------------------------------------------------------------------------ the servers' profile
def engine_pool_config(args: EngineArgs) -> PoolConfig | None:
    """The CPU attention pool an engine of these args starts: None when its policy and BE placement never offload
    (then the profile leaves the pool out, and its cache key says so)."""
    from omniserve.cpu_attention import PoolConfig

    if not offload_mode(args.policy, args.be_decode_placement).uses_pool:
        return None
    memory = None if args.cpu_attention_memory_gib is None else int(args.cpu_attention_memory_gib * 2**30)
    return PoolConfig(args.cpu_attention_workers, args.cpu_attention_threads, local_memory_bytes=memory)


def profile_settings(args: EngineArgs, model_limit: int, pool_config: PoolConfig | None) -> dict:
    """What load_or_profile and profile_cache_path take from an engine's settings, besides the model, device and
    dtype (`model_limit`: the model's longest context). They are part of the profile's cache key, so everything that
    looks a profile up must derive them alike."""
    max_context = min(args.max_model_len or model_limit, model_limit)
    return dict(max_num_tokens=args.max_num_batched_tokens, max_context=max_context, page_size=args.block_size,
                pool_config=pool_config)


def load_model_as_engine(args: EngineArgs):
    """The model an engine of these args loads, on its device and dtype: (loaded model, device, dtype). Sets torch's
    threads and seed as the engine does (the thread count is part of the profile's cache key)."""
    import torch

    from omniserve.config import resolve_device, resolve_dtype
    from omniserve.models.loader import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, device, dtype, args.max_model_len, args.load_format, args.seed), device, dtype


def latency_model_for(args: EngineArgs) -> LatencyModel:
    """The latency model an engine of these args loads: from args.profile_path or the profile cache, profiled (and
    cached, where a server then finds it) when missing."""
    from omniserve.profiler.profiler import load_or_profile

    loaded, device, dtype = load_model_as_engine(args)
    return load_or_profile(loaded.model, device, dtype, model_name=str(loaded.path or args.model),
                           path=args.profile_path,
                           **profile_settings(args, loaded.config.max_context, engine_pool_config(args)))


def server_engine_args(server_args: list[str]) -> EngineArgs:
    """The engine settings among `omniserve serve` arguments; the server's own (--port, --api-key, ...) are left
    to the servers, and so is a positional model tag: give the model as --model."""
    parser = argparse.ArgumentParser(prog="omniserve serve", add_help=False)
    EngineArgs.add_cli_args(parser)
    known, _ = parser.parse_known_args(server_args)
    return EngineArgs.from_cli_args(known)


def slos_from_profile(server_args: list[str], max_prompt: int, tpot_factor: float, ttft_factor: float) -> Slo:
    """The LS SLOs for the servers' model and settings (see slos_from_latency), from their latency profile."""
    args = server_engine_args(server_args)
    return slos_from_latency(latency_model_for(args), max_prompt, args.max_num_batched_tokens,
                             args.iteration_budget_share, tpot_factor, ttft_factor)
