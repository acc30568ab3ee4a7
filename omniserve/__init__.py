"""omniserve: serving LLMs to latency-sensitive and best-effort traffic on one set of GPUs."""

from omniserve.engine.args import EngineArgs
from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import CompletionOutput, RequestOutput
from omniserve.entrypoints.llm import LLM
from omniserve.sampling.params import InvalidRequestError, SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "InvalidRequestError",
]
__version__ = "0.1.0"
