"""Everything a user can set on an engine, flat (CLI flags and LLM(...) keywords), with vLLM's names. Defaults that
the scheduler and the KV cache also have are read from their config classes, so that they are written once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from omniserve.config import CacheConfig
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.policy import (
    BE_DECODE_PLACEMENTS, OFFLOAD_PIPELINES, POLICIES, OffloadMode, offload_mode,
)

if TYPE_CHECKING:
    from omniserve.cpu_attention import PoolConfig


def _arg(default, help: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = _arg(
        None, "Hugging Face folder, GGUF file, or (with --load-format dummy) a known model name such as llama-3-8b; "
        "default: the built-in SmolLM2-135M-Instruct")
    load_format: str = _arg("auto", "`auto` loads the weights; `dummy` makes random weights of the model's shapes")
    device: str | None = _arg(None, "cuda or cpu; default: CUDA when present")
    dtype: str | None = _arg(None, "float32, bfloat16, float16 or float64; default: bf16 on CUDA, fp32 on the CPU")
    max_model_len: int | None = _arg(None, "longest prompt + output in tokens; default: the model's own limit")
    max_num_seqs: int = _arg(SchedulerConfig.max_num_seqs, "most requests running at once")
    max_num_batched_tokens: int = _arg(
        SchedulerConfig.max_num_batched_tokens, "token budget of one iteration; longer prefills are chunked")
    block_size: int = _arg(CacheConfig.page_size, "tokens per KV page")
    num_gpu_blocks_override: int | None = _arg(None, "exact number of KV pages, instead of sizing by memory")
    kv_cache_memory_bytes: int | None = _arg(
        None, "KV cache size in bytes; default: 90%% of free GPU memory, or 2 GiB on the CPU")
    gpu_memory_utilization: float | None = _arg(
        None, "share of the memory the engine may use for weights, activations and KV cache together, in (0, 1]: "
        "of the GPU's memory, or on the CPU of the memory available at start-up; the KV cache gets what the weights "
        "and the activation peak leave (--kv-cache-memory-bytes and --num-gpu-blocks-override win); default: the KV "
        "cache as --kv-cache-memory-bytes says")
    be_decode_placement: str = _arg(
        SchedulerConfig.be_decode_placement, "where best-effort requests decode under the omniserve policy: auto (in "
        "the CPU attention pool when device KV pages or iteration time run short, back on the device when both are "
        "plentiful), cpu (in the pool from the first token on), device (never offload: no CPU pool); neo offloads any "
        "request, whatever this says",
        choices=BE_DECODE_PLACEMENTS)
    policy: str = _arg(
        SchedulerConfig.policy, "scheduling policy: omniserve, or a competitor's on the same engine for comparison "
        "(sarathi, llumnix, neo, fcfs)", choices=POLICIES)
    ls_ttft_slo: float | None = _arg(
        None, "seconds to first token promised to latency-sensitive requests; those that cannot make it are rejected")
    ls_tpot_slo: float | None = _arg(
        None, "seconds per output token promised to latency-sensitive requests; bounds every iteration")
    services: str | None = _arg(
        None, "TOML or YAML file of named services, each with its class (ls/be) and SLOs (instead of the two flags)")
    profile_path: str | None = _arg(
        None, "latency profile (JSON) for the SLO scheduler; default: cached per model, device and dtype, and "
        "profiled at start-up when missing")
    iteration_budget_share: float = _arg(
        SchedulerConfig.iteration_budget_share,
        "share of the TPOT SLO an iteration is planned to fill (the rest absorbs prediction error)")
    offload_pipeline: str = _arg(
        SchedulerConfig.offload_pipeline, "how far an offloaded token goes per iteration: multi-layer (every layer "
        "whose CPU result is back in time; the device may wait for results within the iteration's slack under the "
        "TPOT budget), one-layer (one layer per iteration, the device never waits: the OmniServe paper's design), "
        "sync (every layer, the device waiting for each: NEO's pipeline)", choices=OFFLOAD_PIPELINES)
    ls_headroom: float = _arg(
        SchedulerConfig.ls_headroom, "llumnix policy: share of device KV pages reserved for latency-sensitive requests")
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
    seed: int = _arg(0, "seed for random weights and for requests without a seed of their own")
    threads: int | None = _arg(None, "CPU threads for the model when the device is the CPU; default: torch's choice")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(
                "--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["help"],
                choices=f.metadata["choices"],
            )

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
