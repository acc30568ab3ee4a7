"""From the engine's raw results to RequestOutputs: text, stop strings, a request's n completions, logprobs, metrics.

The engine thread makes only plain data, cheaply: a NewRequest when it queues a request, and per step a
CompletionUpdate for each completion that moved (its new token, that token's logprob, how it ended, its times). An
OutputProcessor owns everything else per request (detokenizers, the accumulated CompletionOutputs) and turns those
into RequestOutputs. LLMEngine.step() runs it inline; AsyncEngine runs it on a thread of its own, so that what the
outputs cost (detokenisation, snapshots, streaming) is not host time of the engine thread.

A stop string is found here, after the engine produced the token: the processor ends the completion at once (what
callers see stops there) and asks the engine, through `on_stop`, to finish the request; tokens the engine made before
that landed are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omniserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from omniserve.engine.scheduler.request import Request
from omniserve.sampling.params import SampledToken, SamplingParams
from omniserve.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class NewRequest:
    """What the output processor needs to know of a request the engine queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    """As the engine resolved them (the service's name and class filled in); n completions."""
    arrival_time: float
    ttft_slo: float | None
    tpot_slo: float | None


@dataclass(slots=True)
class CompletionUpdate:
    """One completion's state after an engine step, as plain data (the scheduler's Request goes on changing). Made
    per completion per step on the engine thread, so kept cheap: not frozen (a frozen dataclass's __init__ costs
    several times more), never changed once made."""

    request_id: str
    """The caller's id (of the whole request, all n completions)."""
    index: int
    token_id: int | None
    """The token sampled in this step; None: no new token (it ended without one, or a sibling moved)."""
    logprob: SampledToken | None
    finish_reason: str | None
    stop_reason: int | str | None
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    num_preemptions: int
    num_swap_outs: int
    num_cached_tokens: int | None

    @classmethod
    def of(cls, request_id: str, index: int, request: Request, new_token: bool) -> CompletionUpdate:
        """The update for a scheduler request; new_token: it sampled one in this step (its last)."""
        token_id = request.token_ids[-1] if new_token else None
        logprob = request.logprobs[-1] if new_token and request.params.logprobs is not None else None
        return cls(request_id, index, token_id, logprob, request.finish_reason, request.stop_reason,
                   request.first_scheduled_time, request.first_token_time, request.last_token_time,
                   request.num_preemptions, request.num_swap_outs, request.num_cached_tokens)


StopCallback = Callable[[str, int, str], None]
"""on_stop(request_id, index, stop string): a stop string ended that completion; the engine should finish it."""


@dataclass
class _Completion:
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None
    latest: CompletionUpdate | None = None
    """Its latest update taken (times and counts, for the metrics)."""


@dataclass
class _RequestState:
    new: NewRequest
    completions: list[_Completion]

    @property
    def finished(self) -> bool:
        return all(c.output.finished for c in self.completions)


class OutputProcessor:
    """The per-request output state, and RequestOutputs made from the engine's updates. One thread uses it."""

    def __init__(self, tokenizer, on_stop: StopCallback) -> None:
        self.tokenizer = tokenizer
        self._on_stop = on_stop
        self._requests: dict[str, _RequestState] = {}

    @property
    def num_requests(self) -> int:
        """Requests whose state is held (every one is dropped when it finishes or is aborted)."""
        return len(self._requests)

    def add_request(self, new: NewRequest) -> None:
        params = new.params
        completions = []
        for index in range(params.n):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, new.prompt_token_ids, params.stop,
                                                     params.skip_special_tokens)
            logprobs = None if params.logprobs is None else []
            completions.append(_Completion(CompletionOutput(index, logprobs=logprobs), detokenizer))
        self._requests[new.request_id] = _RequestState(new, completions)

    def abort_request(self, request_id: str) -> None:
        """Drops the request's state; unknown or finished ids are ignored."""
        self._requests.pop(request_id, None)

    def process(self, updates: list[CompletionUpdate]) -> list[RequestOutput]:
        """One output per request that got a token or ended in these updates, in the order they first appear."""
        touched: dict[str, tuple[_RequestState, bool]] = {}
        for update in updates:
            state = self._requests.get(update.request_id)
            if state is None:
                continue  # ended here already (aborted, or stopped while the engine made more tokens)
            got_token = self._take(state, update)
            earlier = touched.get(update.request_id)
            touched[update.request_id] = (state, got_token or (earlier is not None and earlier[1]))
        return [self._output(state) for state, got_token in touched.values() if got_token or state.finished]

    def _take(self, state: _RequestState, update: CompletionUpdate) -> bool:
        """Applies one update to its completion; returns whether it brought a token shown to callers."""
        completion = state.completions[update.index]
        out = completion.output
        if out.finished:
            return False  # a stop string ended it here: what the engine did after is not shown
        completion.latest = update
        token_id = update.token_id
        if token_id is not None:
            out.token_ids.append(token_id)
            out.delta_token_ids.append(token_id)
            if out.logprobs is not None and update.logprob is not None:
                out.logprobs.append(update.logprob)
        out.finish_reason, out.stop_reason = update.finish_reason, update.stop_reason
        detokenizer = completion.detokenizer
        if token_id is not None and detokenizer is not None:
            detokenizer.add_tokens([token_id])
            stop = detokenizer.stopped_by
            if stop is not None and out.finish_reason is None:
                out.finish_reason, out.stop_reason = "stop", stop
                self._on_stop(state.new.request_id, update.index, stop)
        return token_id is not None

    def _output(self, state: _RequestState) -> RequestOutput:
        finished = state.finished
        for completion in state.completions:
            out = completion.output
            if completion.detokenizer is not None:
                out.delta_text = completion.detokenizer.take_delta(out.finished)
                out.text += out.delta_text
        new = state.new
        result = RequestOutput(
            request_id=new.request_id, prompt=new.prompt, prompt_token_ids=new.prompt_token_ids,
            outputs=[_snapshot(c.output) for c in state.completions], finished=finished, metrics=_metrics(state),
            num_cached_tokens=_cached_tokens(state),
        )
        for completion in state.completions:
            completion.output.delta_text = ""
            completion.output.delta_token_ids = []
        if finished:
            del self._requests[new.request_id]
        return result


def _metrics(state: _RequestState) -> RequestMetrics:
    """One request's times; for n > 1 completions, the first of each event and the last token of all."""
    new = state.new
    latest = [c.latest for c in state.completions if c.latest is not None]

    def first(times):
        return min((t for t in times if t is not None), default=None)

    return RequestMetrics(
        arrival_time=new.arrival_time,
        first_scheduled_time=first(u.first_scheduled_time for u in latest),
        first_token_time=first(u.first_token_time for u in latest),
        last_token_time=max((u.last_token_time for u in latest if u.last_token_time is not None), default=None),
        service=new.params.service,
        service_class=new.params.service_class.value,
        ttft_slo=new.ttft_slo,
        tpot_slo=new.tpot_slo,
        num_preemptions=sum(u.num_preemptions for u in latest),
        num_swap_outs=sum(u.num_swap_outs for u in latest),
    )


def _cached_tokens(state: _RequestState) -> int | None:
    """Prompt tokens found in the prefix cache: the most any of the n completions found (None: none started)."""
    return max((c.latest.num_cached_tokens for c in state.completions
                if c.latest is not None and c.latest.num_cached_tokens is not None), default=None)


def _snapshot(out: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        index=out.index, text=out.text, token_ids=list(out.token_ids), finish_reason=out.finish_reason,
        stop_reason=out.stop_reason, logprobs=None if out.logprobs is None else list(out.logprobs),
        delta_text=out.delta_text, delta_token_ids=list(out.delta_token_ids),
    )
