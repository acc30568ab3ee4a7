"""Everything a user can set on an engine, flat (CLI flags and LLM(...) keywords), with vLLM's names. The scheduler's
settings are inherited from their one declaration (SchedulerSettings); the KV cache's defaults are read from
CacheConfig, so that they are written once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from omniserve.config import CacheConfig
from omniserve.engine.scheduler.config import SCHEDULER_SETTINGS, SchedulerSettings, add_flags
from omniserve.engine.scheduler.policy import OffloadMode, offload_mode

if TYPE_CHECKING:
    from omniserve.cpu_attention import PoolConfig


def _arg(default, help: str):
    return field(default=default, metadata={"help": help, "choices": None})


@dataclass(frozen=True)
class EngineArgs(SchedulerSettings):
    """The engine's own settings, and the scheduler's (inherited: max_num_seqs, policy, ...)."""

    model: str | None = _arg(
        None, "Hugging Face folder, GGUF file, or (with --load-format dummy) a known model name such as llama-3-8b; "
        "default: the built-in SmolLM2-135M-Instruct")
    load_format: str = _arg("auto", "`auto` loads the weights; `dummy` makes random weights of the model's shapes")
    device: str | None = _arg(None, "cuda or cpu; default: CUDA when present")
    dtype: str | None = _arg(
        None, "float32, bfloat16, float16 or float64; default: bf16 on CUDA; on the CPU, bf16 where it has AMX or "
        "AVX-512 BF16 and a bf16 GEMV measured at start-up is faster, else fp32")
    # The scheduler's setting, but unknown until the model is loaded.
    max_model_len: int | None = _arg(None, "longest prompt + output in tokens; default: the model's own limit")
    block_size: int = _arg(CacheConfig.page_size, "tokens per KV page")
    enable_prefix_caching: bool = _arg(
        True, "reuse the KV of prompt prefixes that earlier requests computed (full pages, found by the hash of "
        "their tokens; requests of different API keys or cache salts share none)")
    kv_offloading_size: float | None = _arg(
        None, "GiB of host memory for the prefix cache's host tier: cached pages evicted from the device are kept "
        "there and copied back instead of computed again (with a CPU attention pool, at most its host budget, and "
        "giving way to offloaded KV); default: none")
    num_gpu_blocks_override: int | None = _arg(None, "exact number of KV pages, instead of sizing by memory")
    kv_cache_memory_bytes: int | None = _arg(
        None, "KV cache size in bytes; default: 90%% of free GPU memory, or 2 GiB on the CPU")
    gpu_memory_utilization: float | None = _arg(
        None, "share of the memory the engine may use for weights, activations and KV cache together, in (0, 1]: "
        "of the GPU's memory, or on the CPU of the memory available at start-up; the KV cache gets what the weights "
        "and the activation peak leave (--kv-cache-memory-bytes and --num-gpu-blocks-override win); default: the KV "
        "cache as --kv-cache-memory-bytes says")
    ls_ttft_slo: float | None = _arg(
        None, "seconds to first token promised to latency-sensitive requests; those that cannot make it are rejected")
    ls_tpot_slo: float | None = _arg(
        None, "seconds per output token promised to latency-sensitive requests; bounds every iteration")
    services: str | None = _arg(
        None, "TOML or YAML file of named services, each with its class (ls/be) and SLOs (instead of the two flags)")
    profile_path: str | None = _arg(
        None, "latency profile (JSON) for the SLO scheduler; default: cached per model, device and dtype, and "
        "profiled at start-up when missing")
    cpu_attention_workers: int = _arg(1, "CPU attention worker processes (started on first offload)")
    cpu_attention_threads: int = _arg(1, "torch threads in each CPU attention worker")
    cpu_attention_memory_gib: float | None = _arg(
        None, "host KV the local CPU attention workers may hold before offloaded requests go to remote hosts; with "
        "the remote hosts' memory, the most the engine offloads (requests counted at their final size); default: "
        "half the memory available at start-up")
    cpu_attention_hosts: str | None = _arg(
        None, "remote CPU attention hosts on the Ray cluster: a number of actors spread over its nodes, or `auto`: "
        "one on every node that offers the omniserve_cpu_host resource, nodes that join later included")
    cpu_attention_host_memory_gib: float | None = _arg(
        None, "host KV each remote CPU attention host may hold; default: 80%% of its available memory")
    ray_address: str | None = _arg(
        None, "Ray cluster to join (`auto`, or the head's host:port); default: a Ray instance of this process's own, "
        "started when scale-out needs one")
    enforce_eager: bool = _arg(
        False, "run every iteration eagerly: no CUDA graphs (by default, decode iterations without offloaded rows "
        "replay graphs captured at start-up, one per padded batch size)")
    chat_template: str | None = _arg(
        None, "a Jinja chat template in place of the model's: a file, the template itself, or `chatml-tools` (ChatML "
        "with Hermes-style tool calls, for ChatML models whose template knows no tools, such as the built-in model)")
    enable_auto_tool_choice: bool = _arg(
        False, "let the model decide when to call tools (tool_choice auto, the default when a request has tools); "
        "needs --tool-call-parser")
    tool_call_parser: str | None = field(default=None, metadata={
        "help": "how tool calls are read from the model's answers under tool_choice auto: hermes (<tool_call> "
        "blocks, as chatml-tools writes them) or llama3_json", "choices": ("hermes", "llama3_json")})
    seed: int = _arg(0, "seed for random weights and for requests without a seed of their own")
    threads: int | None = _arg(None, "CPU threads for the model when the device is the CPU; default: torch's choice")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_flags(parser, [f for f in fields(cls) if f.name not in SCHEDULER_SETTINGS])
        add_flags(parser.add_argument_group("scheduler"), [f for f in fields(cls) if f.name in SCHEDULER_SETTINGS])

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    # What an engine of these args builds, for those that must build the same without an engine: `omniserve profile`
    # and the benchmark's SLOs look up the profile the engine will, and its cache key is made of these.
    @property
    def offload_mode(self) -> OffloadMode:
        return offload_mode(self.policy, self.be_decode_placement)

    def pool_config(self) -> PoolConfig | None:
        """The CPU attention pool the engine starts; None when its policy and placement never offload."""
        from omniserve.cpu_attention import PoolConfig

        if not self.offload_mode.uses_pool:
            return None
        memory = None if self.cpu_attention_memory_gib is None else int(self.cpu_attention_memory_gib * 2**30)
        return PoolConfig(self.cpu_attention_workers, self.cpu_attention_threads, local_memory_bytes=memory)

    def profile_settings(self, model_limit: int, pool_config: PoolConfig | None) -> dict:
        """What load_or_profile and profile_cache_path take besides the model, device and dtype (`model_limit`: the
        model's longest context)."""
        return dict(max_num_tokens=self.max_num_batched_tokens, max_context=min(self.max_model_len or model_limit,
                    model_limit), page_size=self.block_size, pool_config=pool_config)

    def load_model(self):
        """(the loaded model, device, dtype), with torch's threads and seed set as the engine sets them (the thread
        count is part of the profile's cache key)."""
        import torch

        from omniserve.config import resolve_device, resolve_dtype
        from omniserve.models.loader import load_model

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        if self.threads and device.type == "cpu":
            torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        return load_model(self.model, device, dtype, self.max_model_len, self.load_format, self.seed), device, dtype
