"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, min_tokens, presence, frequency
and repetition penalties, logprobs and structured outputs' masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve.ops import transfer
from omniserve.sampling.params import SampledToken, SamplingParams
from omniserve.sampling.structured import RequestGrammar, apply_grammar_masks


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    num_generated: int
    """Tokens the request has generated so far: the step index for its seed, and the min_tokens clock."""
    grammar: RequestGrammar | None = None
    """Its structured-output state: the row may draw only what it allows next."""
    seen_token_ids: list[int] | None = None
    """With penalties: the request's prompt and generated tokens (the last num_generated are generated)."""


def _step_seed(seed: int, step: int) -> int:
    # One independent stream per (seed, step): the token drawn at step i depends on nothing but the seed and the logits,
    # so it is the same however the request is batched, chunked or preempted.
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63)


def sample(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...]) -> list[SampledToken]:
    """logits: [len(rows), vocab], fp32 or fp64. Returns one token per row.

    Everything runs on the logits' device, decided from the rows' parameters on the host (never from a device value),
    and what comes back (token ids, and log-probabilities where asked for) comes back in one copy: on a GPU, the
    step's only wait for the device."""
    logits = _ban_until_min_tokens(logits, rows, eos_token_ids)
    scores = logits  # what logprobs report: the model's, as vLLM's default (nor penalties nor a grammar's mask)
    if any(row.seen_token_ids is not None for row in rows):
        logits = _apply_penalties(logits, rows)
    if any(row.grammar is not None for row in rows):
        logits = apply_grammar_masks(logits, [row.grammar for row in rows])
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows and len(random_rows) == len(rows):
        token_ids = _sample_random(logits, rows)
    elif random_rows:
        index = transfer.to_device(random_rows, logits.device)
        drawn = _sample_random(logits.index_select(0, index), [rows[i] for i in random_rows])
        token_ids = token_ids.index_copy(0, index, drawn)

    top = max((row.params.logprobs or 0 for row in rows if row.params.logprobs is not None), default=None)
    if top is None:
        return [SampledToken(int(t)) for t in transfer.to_host(token_ids)]
    logprobs = torch.log_softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    best = torch.topk(logprobs, top) if top else None
    parts = [token_ids, chosen] + ([best.indices, best.values] if best is not None else [])
    values = transfer.to_host(torch.cat([part.reshape(len(rows), -1).double() for part in parts], dim=1))
    out = []
    for row, (token, logprob, *rest) in zip(rows, values):
        wanted = row.params.logprobs
        if wanted is None:
            out.append(SampledToken(int(token)))
            continue
        pairs = tuple((int(i), v) for i, v in zip(rest[:top][:wanted], rest[top:][:wanted]))
        out.append(SampledToken(int(token), logprob, pairs))
    return out


def _ban_until_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: tuple[int, ...]):
    """Rows short of their min_tokens cannot draw their stop tokens (nor EOS, unless ignored): one indexed write."""
    banned_rows, banned_tokens = [], []
    for i, row in enumerate(rows):
        if row.num_generated < row.params.min_tokens:
            banned = list(row.params.stop_token_ids) + ([] if row.params.ignore_eos else list(eos_token_ids))
            banned_rows += [i] * len(banned)
            banned_tokens += banned
    if not banned_rows:
        return logits
    index = transfer.to_device([banned_rows, banned_tokens], logits.device)
    return logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                device=logits.device))


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM's (and OpenAI's) penalties on the rows that have them: the logit of each token the completion used drops
    by the presence penalty, and by the frequency penalty per use; a repetition penalty r divides the positive logits
    (multiplies the negative ones) of every token in the prompt or the completion. The rows' tokens go to the device
    in one copy and are counted there."""
    penalized = [i for i, row in enumerate(rows) if row.seen_token_ids is not None]
    vocab = logits.shape[1]
    output_rows, output_tokens, seen_rows, seen_tokens = [], [], [], []
    for k, i in enumerate(penalized):
        seen, generated = rows[i].seen_token_ids, rows[i].num_generated
        output = seen[len(seen) - generated:] if generated else []
        output_rows += [k] * len(output)
        output_tokens += output
        if rows[i].params.repetition_penalty != 1.0:
            seen_rows += [k] * len(seen)
            seen_tokens += seen
    settings = [[rows[i].params.presence_penalty for i in penalized],
                [rows[i].params.frequency_penalty for i in penalized],
                [rows[i].params.repetition_penalty for i in penalized]]
    parts = [penalized, output_rows, output_tokens, seen_rows, seen_tokens]
    flat = transfer.to_device([i for part in parts for i in part], logits.device)
    index, output_rows, output_tokens, seen_rows, seen_tokens = flat.split([len(part) for part in parts])
    presence, frequency, repetition = transfer.to_device(settings, logits.device, logits.dtype)
    counts = torch.zeros(len(penalized), vocab, dtype=logits.dtype, device=logits.device)
    counts.index_put_((output_rows, output_tokens), torch.ones_like(output_tokens, dtype=logits.dtype), accumulate=True)
    part = logits.index_select(0, index)
    if seen_rows.numel():
        seen = torch.zeros(len(penalized), vocab, dtype=torch.bool, device=logits.device)
        seen[seen_rows, seen_tokens] = True
        factor = torch.where(part > 0, 1.0 / repetition.unsqueeze(1), repetition.unsqueeze(1))
        part = torch.where(seen, part * factor, part)
    part = part - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits.index_copy(0, index, part)


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[1]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    # The rows' settings in one copy: [4, rows] of temperature, top-k, top-p, min-p.
    settings = transfer.to_device([[r.params.temperature for r in rows], top_k, top_p, min_p], device, logits.dtype)
    logits = logits / settings[0].unsqueeze(1)

    order = None
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        # Truncate in descending order: top-k keeps a prefix, top-p the prefix whose mass reaches p.
        logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        logits = logits.masked_fill(ranks >= settings[1].unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        logits = logits.masked_fill(mass_before >= settings[2].unsqueeze(1), float("-inf"))  # the first token stays

    probs = logits.softmax(dim=-1)
    if any(p > 0 for p in min_p):
        floor = settings[3].unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)

    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Seeded rows draw E from their own generator.
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(_step_seed(row.params.seed, row.num_generated))
            noise[i] = torch.empty(vocab, device=device, dtype=probs.dtype).exponential_(generator=generator)
    chosen = (probs / noise).argmax(dim=-1)
    return chosen if order is None else order.gather(1, chosen.unsqueeze(1)).squeeze(1)
