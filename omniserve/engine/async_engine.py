"""The engine for servers: an LLMEngine stepping in a thread of its own, with asyncio callers on the other side.

The event loop never runs model code, and the engine never waits on a client: each request's outputs go into its own
asyncio queue, so one slow reader delays nobody else. All calls into the LLMEngine happen on the engine thread; the
event loop only posts commands (add, abort) to an inbox, and reads the outputs the thread posts back.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import RequestOutput
from omniserve.malloc import trim_heap
from omniserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # an idle engine thread re-checks its inbox at least this often
_TRIM_AFTER_IDLE_S = 1.0  # an engine idle this long gives the heap's free pages back to the OS, once per idle spell


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or failed): no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_iteration: Callable[[LLMEngine, list[RequestOutput]], None] | None = None):
        """on_iteration runs on the engine thread after every step, with that step's outputs (metrics hook)."""
        self.engine = engine
        self.on_iteration = on_iteration
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omniserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ event-loop side
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they come (the last one has finished=True). Raises InvalidRequestError if
        the engine refuses the request. Leaving the iteration early (a client gone) aborts the request."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        # Stamped here: the engine thread takes the request only after the iteration it is running.
        self._post(("add", request_id, prompt, params, stream, time.monotonic()))
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
        self.engine.shutdown()

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    # ---------------------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        last_step: float | None = None  # when the engine last ran an iteration; None: idle and trimmed since
        try:
            while not self._stopping.is_set():
                if self._take_commands() and self.on_iteration is not None:
                    self.on_iteration(self.engine, [])  # aborts change the gauges even when nothing else runs
                if not self.engine.has_unfinished_requests():
                    if last_step is not None and time.monotonic() - last_step >= _TRIM_AFTER_IDLE_S:
                        trim_heap()  # what the load freed, back to the OS (see omniserve/malloc.py)
                        last_step = None
                    self._wakeup.wait(_IDLE_POLL_S)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                last_step = time.monotonic()
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.put(output)
                        if output.finished:
                            del self._streams[output.request_id]
                if self.on_iteration is not None:
                    self.on_iteration(self.engine, outputs)
        except BaseException as exc:  # the engine itself broke (step() already contains per-request failures)
            logger.exception("the engine thread failed")
            self._fail_all(EngineDeadError(f"the engine failed: {exc}"))
            raise
        self._take_commands()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _take_commands(self) -> int:
        """Runs the commands posted so far; returns how many."""
        taken = 0
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return taken
            taken += 1
            if command[0] == "add":
                _, request_id, prompt, params, stream, arrival_time = command
                try:
                    self.engine.add_request(request_id, prompt, params, arrival_time)
                except Exception as exc:  # bad input: the caller gets the error, nothing is queued
                    stream.put(exc)
                    continue
                self._streams[request_id] = stream
            else:
                _, request_id = command
                self.engine.abort_request(request_id)
                self._streams.pop(request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
