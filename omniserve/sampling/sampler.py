"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, min_tokens and logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve.sampling.params import SampledToken, SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    num_generated: int
    """Tokens the request has generated so far: the step index for its seed, and the min_tokens clock."""


def _step_seed(seed: int, step: int) -> int:
    # One independent stream per (seed, step): the token drawn at step i depends on nothing but the seed and the logits,
    # so it is the same however the request is batched, chunked or preempted.
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63)


def sample(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...]) -> list[SampledToken]:
    """logits: [len(rows), vocab], fp32 or fp64. Returns one token per row."""
    logits = logits.clone()
    for i, row in enumerate(rows):
        if row.num_generated < row.params.min_tokens:
            banned = list(row.params.stop_token_ids) + ([] if row.params.ignore_eos else list(eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")

    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        token_ids[random_rows] = _sample_random(logits[random_rows], [rows[i] for i in random_rows])

    want_logprobs = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not want_logprobs:
        return [SampledToken(int(t)) for t in token_ids.tolist()]
    logprobs = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    token_list = token_ids.tolist()
    out = []
    for i, row in enumerate(rows):
        if row.params.logprobs is None:
            out.append(SampledToken(token_list[i]))
            continue
        top = torch.topk(logprobs[i], row.params.logprobs) if row.params.logprobs else None
        top_pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        out.append(SampledToken(token_list[i], float(logprobs[i, token_list[i]]), top_pairs))
    return out


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    logits = logits / temperature.unsqueeze(1)
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    vocab = logits.shape[1]

    order = None
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        # Truncate in descending order: top-k keeps a prefix, top-p the prefix whose mass reaches p.
        logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device).unsqueeze(1)
        logits = logits.masked_fill(ranks >= k, float("-inf"))
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_p, device=device, dtype=probs.dtype).unsqueeze(1)
        logits = logits.masked_fill(mass_before >= p, float("-inf"))  # the first token always stays

    min_p = torch.tensor([r.params.min_p for r in rows], device=device, dtype=logits.dtype).unsqueeze(1)
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)

    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Seeded rows draw E from their own generator.
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(_step_seed(row.params.seed, row.num_generated))
            noise[i] = torch.empty(vocab, device=device, dtype=probs.dtype).exponential_(generator=generator)
    chosen = (probs / noise).argmax(dim=-1)
    return chosen if order is None else order.gather(1, chosen.unsqueeze(1)).squeeze(1)
