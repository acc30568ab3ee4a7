"""omniserve: serving LLMs to latency-sensitive and best-effort traffic on one set of GPUs."""

from omniserve.lazy import lazy_exports

# Imported on first use, so that the torch-free parts (the scheduler, the simulator, the benchmark client) load
# without torch and the models.
_EXPORTS = {
    "LLM": "omniserve.entrypoints.llm",
    "LLMEngine": "omniserve.engine.llm_engine",
    "EngineArgs": "omniserve.engine.args",
    "SamplingParams": "omniserve.sampling.params",
    "RequestOutput": "omniserve.engine.outputs",
    "CompletionOutput": "omniserve.engine.outputs",
    "InvalidRequestError": "omniserve.sampling.params",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"

__getattr__ = lazy_exports(__name__, _EXPORTS)
