"""Offline generation: `LLM(...).generate(prompts, SamplingParams(...))` and `LLM.chat(...)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from omniserve.cpu_attention import PoolConfig
from omniserve.engine.args import EngineArgs
from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import RequestOutput
from omniserve.profiler import profiled_latency_model
from omniserve.sampling.params import InvalidRequestError, SamplingParams

Prompt = str | list[int]
Conversation = list[dict[str, str]]


class LLM:
    """Runs a batch of prompts to completion with continuous batching. Keywords are EngineArgs fields."""

    def __init__(self, model: str | None = None, pool_config: PoolConfig | None = None, **kwargs) -> None:
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs), pool_config=pool_config,
                                latency_model=profiled_latency_model)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. A list of ints is one tokenised prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError("give one SamplingParams, or one per prompt", "sampling_params")
        # Taken after a pause: the device is measured first, as a server's idle engine does meanwhile, so that these
        # requests' admission needs no scratch iterations within their TTFT.
        self.engine.refresh_measurements()
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
            return self._run(ids, use_tqdm)
        finally:  # an invalid prompt, or an interrupt, must not leave the others queued
            for request_id in ids:
                self.engine.abort_request(request_id)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation (and the tools, OpenAI's function definitions, the
        model may call), then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: Conversation, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template", "messages")
        encoded = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True, tools=tools
        )
        return list(encoded["input_ids"])

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm, leave=False) as bar:
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in request_ids]
