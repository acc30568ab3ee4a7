"""The engine for servers: an LLMEngine stepping in a thread of its own, with asyncio callers on the other side.

The event loop never runs model code, and the engine never waits on a client: each request's outputs go into its own
asyncio queue, so one slow reader delays nobody else. All calls into the LLMEngine happen on the engine thread; the
event loop only posts commands (add, abort) to an inbox.

The engine thread only schedules and runs iterations: it hands each iteration's raw updates (plain data) to an output
thread and goes on to the next. The output thread owns an OutputProcessor (text, stop strings, RequestOutputs) and puts
the outputs into the streams. A stop string it finds ends the request at once for the caller, and is posted to the
engine's inbox (as an abort is) to finish the request there; tokens made meanwhile are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.output_processor import OutputProcessor
from omniserve.engine.outputs import RequestOutput
from omniserve.engine.scheduler.request import RequestGroup
from omniserve.malloc import trim_heap
from omniserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # an idle engine thread re-checks its inbox at least this often
_TRIM_AFTER_IDLE_S = 1.0  # an engine idle this long gives the heap's free pages back to the OS, once per idle spell
_TRIM_UNDER_LOAD_S = 2.0
"""A busy engine gives them back this often too: under a load that never pauses, the free fragments that each peak
leaves would otherwise stay, and the server's RSS would climb by steps to its worst fragmentation."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or failed): no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine's threads."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed: nobody reads this stream any more
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_iteration: Callable[[LLMEngine, list[RequestOutput]], None] | None = None):
        """on_iteration runs on the engine thread after every step (metrics hook), with the outputs the output thread
        has delivered since the previous call; and when the engine is idle, as soon as it delivers some."""
        self.engine = engine
        self.on_iteration = on_iteration
        self.processor = OutputProcessor(engine.tokenizer, self._post_stop)  # output thread only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()  # engine thread -> output thread, in order
        self._delivered: deque[RequestOutput] = deque()  # output thread -> on_iteration on the engine thread
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # output thread only
        self._stopping = threading.Event()
        self._output_thread = threading.Thread(target=self._deliver, name="omniserve-outputs", daemon=True)
        self._thread = threading.Thread(target=self._run, name="omniserve-engine", daemon=True)
        self._output_thread.start()
        self._thread.start()

    # ------------------------------------------------------------------------------------------ event-loop side
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._output_thread.is_alive()

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they come (the last one has finished=True). Raises InvalidRequestError if
        the engine refuses the request. Leaving the iteration early (a client gone) aborts the request."""
        [outputs] = self.generate_all([(request_id, prompt)], params)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # left early: its own end aborts the request now

    def generate_all(self, prompts: list[tuple[str, str | list[int]]], params: SamplingParams
                     ) -> list[AsyncIterator[RequestOutput]]:
        """As generate, for the prompts (request id, prompt) of one API request: they are queued in one turn of the
        engine, and admitted or rejected as one (RequestGroup), so that none runs if the request is turned away. If
        the engine refuses one, none is queued and every iterator raises that error. Queued at once: the caller
        aborts each it does not read to its end."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        entries = [(request_id, prompt, _Stream(loop, asyncio.Queue())) for request_id, prompt in prompts]
        # Stamped here: the engine thread takes the requests only after the iteration it is running.
        self._post(("add_all", entries, params, time.monotonic()))
        return [self._outputs(request_id, stream) for request_id, _, stream in entries]

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request and frees everything it holds, at the engine's next turn (thread-safe)."""
        self._post(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stops the engine thread (requests still running get an EngineDeadError) and the engine's workers."""
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout_s)
        self._output_thread.join(timeout_s)
        self.engine.shutdown()

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def _post_stop(self, request_id: str, index: int, stop: str) -> None:
        """From the output thread: a stop string ended a completion; the engine finishes it at its next turn."""
        self._post(("stop", request_id, index, stop))

    # ---------------------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        last_step: float | None = None  # when the engine last ran an iteration; None: idle and trimmed since
        last_trim = time.monotonic()
        try:
            while not self._stopping.is_set():
                commands = self._take_commands()
                if not self.engine.has_unfinished_requests():
                    self._report(commands > 0)  # aborts change the gauges even when nothing else runs
                    if last_step is not None and time.monotonic() - last_step >= _TRIM_AFTER_IDLE_S:
                        trim_heap()  # what the load freed, back to the OS (see omniserve/malloc.py)
                        last_step, last_trim = None, time.monotonic()
                    # Measured while idle, so that the next request's admission needs no scratch iterations; a
                    # command coming in stops it between two of them.
                    self.engine.refresh_measurements(lambda: not self._inbox.empty() or self._stopping.is_set())
                    self._wakeup.wait(_IDLE_POLL_S)
                    self._wakeup.clear()
                    continue
                if last_step is None:  # a busy spell begins (the heap was trimmed as the last one ended)
                    last_trim = time.monotonic()
                self._handoff.put(("step", self.engine.run_iteration()))
                last_step = time.monotonic()
                if last_step - last_trim >= _TRIM_UNDER_LOAD_S:
                    trim_heap()
                    last_trim = time.monotonic()
                self._report(True)
        except BaseException as exc:  # the engine itself broke (a step already contains per-request failures)
            logger.exception("the engine thread failed")
            self._fail_all(EngineDeadError(f"the engine failed: {exc}"))
            raise
        self._take_commands()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _report(self, always: bool) -> None:
        """Calls on_iteration with the outputs delivered since its previous call (if any, or if `always`)."""
        if self.on_iteration is None:
            return
        outputs = []
        while self._delivered:
            outputs.append(self._delivered.popleft())
        if outputs or always:
            self.on_iteration(self.engine, outputs)

    def _take_commands(self) -> int:
        """Runs the commands posted so far; returns how many."""
        taken = 0
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return taken
            taken += 1
            if command[0] == "add_all":
                _, entries, params, arrival_time = command
                self._add_all(entries, params, arrival_time)
            elif command[0] == "stop":
                self.engine.stop_completion(*command[1:])
            else:
                _, request_id = command
                self.engine.cancel_request(request_id)
                self._handoff.put(("abort", request_id))

    def _add_all(self, entries: list[tuple[str, str | list[int], _Stream]], params: SamplingParams,
                 arrival_time: float) -> None:
        """Queues every request, as one group, or (bad input) none: each caller then gets the error."""
        group, added = RequestGroup(), []
        try:
            for request_id, prompt, stream in entries:
                added.append((self.engine.enqueue_request(request_id, prompt, params, arrival_time, group), stream))
        except Exception as exc:
            for new, _ in added:
                self.engine.cancel_request(new.request_id)
            for *_, stream in entries:
                stream.put(exc)
            return
        for new, stream in added:
            self._handoff.put(("add", new, stream))

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.unfinished_request_ids):
            self.engine.cancel_request(request_id)
        self._handoff.put(("end", error))

    # ---------------------------------------------------------------------------------------------- output thread
    def _deliver(self) -> None:
        """Takes what the engine thread hands over, in order, until it ends; a failure here fails every stream."""
        broken: EngineDeadError | None = None
        while True:
            item = self._handoff.get()
            if item[0] == "end":
                self._end_streams(broken or item[1])
                return
            if broken is not None:  # the engine thread is stopping: requests it still took get the error
                if item[0] == "add":
                    item[2].put(broken)
                continue
            try:
                self._take(item)
            except Exception as exc:
                logger.exception("the output thread failed")
                broken = EngineDeadError(f"the engine's outputs failed: {exc}")
                self._end_streams(broken)
                self._stopping.set()
                self._wakeup.set()

    def _take(self, item: tuple) -> None:
        kind = item[0]
        if kind == "step":
            self._publish(self.processor.process(item[1]))
        elif kind == "add":
            _, new, stream = item
            self.processor.add_request(new)
            self._streams[new.request_id] = stream
        else:
            _, request_id = item
            self.processor.abort_request(request_id)
            self._streams.pop(request_id, None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Puts a step's outputs into their streams: one wake-up per event loop, not one per stream."""
        if outputs and self.on_iteration is not None:
            self._delivered.extend(outputs)
            self._wakeup.set()  # an idle engine thread records them now
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream.queue, output))
            if output.finished:
                del self._streams[output.request_id]
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed: nobody reads these streams any more
                pass

    def _end_streams(self, error: BaseException) -> None:
        for request_id, stream in self._streams.items():
            self.processor.abort_request(request_id)
            stream.put(error)
        self._streams.clear()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the streams' event loop."""
    for stream_queue, output in items:
        stream_queue.put_nowait(output)
