"""LS SLOs from a latency model, as `omniserve bench --compare` and the policy benchmark set them.

TPOT SLO = a factor x a lone LS decode step. TTFT SLO = a factor x the time to prefill the longest LS prompt next to
one LS decode, in chunks that each fit an iteration budget (what the SLO-aware scheduler does): `budgeted_prefill`.

The latency model comes from the profile cache, under the key the servers will look up: `latency_model_for` loads
the model and calls omniserve.profiler.profiled_latency_model, what the servers hand their engines, without building
an engine.
"""

from __future__ import annotations

import argparse
from typing import Callable

from omniserve.bench.metrics import Slo
from omniserve.engine.args import EngineArgs
from omniserve.engine.scheduler.latency_model import LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.plan import ScheduledChunk
from omniserve.sampling.params import SamplingParams

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


def budgeted_ls_prefill(latency: LatencyModel, prompt_len: int, context: int, scale: float, max_chunk: int,
                        limit: float) -> list[tuple[int, float]]:
    """(tokens, seconds) of each chunk of a `prompt_len`-token LS prefill next to one LS decode at `context`, each
    chunk the largest that fits `limit`, with the latency model scaled by `scale` (a machine's present speed against
    the profile's, as the scheduler's own running correction scales it)."""
    decode = latency_chunk(1, context - 1, True)

    def chunk_time(start: int, count: int) -> float:
        chunk = latency_chunk(count, start, start + count == prompt_len)
        return scale * iteration_time(latency, [decode, chunk])

    return budgeted_prefill(chunk_time, prompt_len, max_chunk, limit, shrink=lambda count: count - 1)


# ------------------------------------------------------------------------------------------ the servers' profile
def latency_model_for(args: EngineArgs) -> LatencyModel:
    """The latency model an engine of these args loads: from args.profile_path or the profile cache, profiled (and
    cached, where a server then finds it) when missing."""
    from omniserve.profiler import profiled_latency_model

    loaded, device, dtype = args.load_model()
    return profiled_latency_model(args, loaded, device, dtype, args.pool_config())


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
