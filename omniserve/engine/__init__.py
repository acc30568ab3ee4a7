"""The engine: the scheduler (torch-free, omniserve.engine.scheduler), the model runner, and the LLMEngine that
drives them. What other parts of omniserve use of it:

    LLMEngine(args, latency_model=...)   one engine: requests in, outputs out, one iteration per step()
    EngineArgs                           everything a user can set on an engine
    AsyncEngine                          an LLMEngine stepping on its own thread, for the server

Imported on first use, so that the scheduler and the simulator load without torch and the models."""

from omniserve.lazy import lazy_exports

_EXPORTS = {
    "LLMEngine": "omniserve.engine.llm_engine",
    "EngineArgs": "omniserve.engine.args",
    "AsyncEngine": "omniserve.engine.async_engine",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
