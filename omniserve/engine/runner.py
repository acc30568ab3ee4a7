"""Executes an IterationPlan on the device: one forward pass over every scheduled token, then sampling."""

from __future__ import annotations

import torch

from omniserve.attention import PagedAttention
from omniserve.engine.plan import IterationPlan, RunnerOutput
from omniserve.kv_cache import PagePool
from omniserve.models.llama import LlamaForCausalLM
from omniserve.sampling.sampler import SamplingRow, sample


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: PagePool, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.attention = PagedAttention(pool, device)
        self.eos_token_ids = model.config.eos_token_ids

    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> RunnerOutput:
        if not plan.chunks:
            return RunnerOutput()
        token_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for chunk in plan.chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.start_position + len(chunk.token_ids)))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
        meta = self.attention.build_metadata([(c.start_position, len(c.token_ids), c.page_ids) for c in plan.chunks])
        hidden = self.model(
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            attend=lambda layer, q, k, v: self.attention(layer, q, k, v, meta),
        )
        sampling = [c for c in plan.chunks if c.sample]
        if not sampling:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[sample_rows])
        tokens = sample(logits, [SamplingRow(c.params, c.num_generated) for c in sampling], self.eos_token_ids)
        return RunnerOutput({c.request_id: t for c, t in zip(sampling, tokens)})
