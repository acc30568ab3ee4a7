"""Engine configuration: one frozen dataclass per concern, validated when built."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def cache_dir() -> Path:
    """Where omniserve keeps what it measures or derives once: latency profiles, workload lengths, batches
    ($OMNISERVE_CACHE_DIR, default ~/.cache/omniserve). Here, not in the profiler: the simulator reads it, and
    runs without torch."""
    return Path(os.environ.get("OMNISERVE_CACHE_DIR") or Path.home() / ".cache" / "omniserve")


def load_config_table(path: str | Path, table: str, what: str) -> dict:
    """The non-empty table `table` of a TOML file (or YAML, by suffix); `what` names the file in errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(text) or {}
        else:
            document = tomllib.loads(text)
    except Exception as exc:  # both parsers' errors say where the file is wrong
        raise ConfigError(f"the {what} {path} does not parse: {exc}") from exc
    entries = document.get(table) if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"the {what} {path} has no `{table}` table")
    return entries


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in the `rope_scaling` / `rope_parameters` entry of a HF config."""

    rope_type: str = "default"
    """One of `default`, `linear`, `llama3`."""
    factor: float = 1.0
    """Context extension factor (`linear`, `llama3`)."""
    low_freq_factor: float = 1.0
    """Llama-3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Llama-3: wavelengths below original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """Llama-3: the context length the model was pre-trained with."""

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope scaling type {self.rope_type!r} (supported: default, linear, llama3)")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model (Llama 2/3, SmolLM2, Mistral, Qwen2)."""

    architecture: str
    """HF architecture name, e.g. `LlamaForCausalLM`."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (grouped-query attention when < num_heads)."""
    vocab_size: int
    """Rows of the embedding and the LM head."""
    head_dim: int = 0
    """Width of one head; 0 means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """RoPE frequency scaling."""
    max_position_embeddings: int = 4096
    """Longest context the model supports."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding matrix."""
    qkv_bias: bool = False
    """Q, K and V projections have a bias (Qwen2)."""
    sliding_window: int | None = None
    """Mistral-style sliding window; we serve such models only up to this length, where attention is full."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation (several for Llama-3 instruct)."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """Longest sequence we can serve exactly (full attention)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size + head + self.hidden_size


_DTYPES = ("float32", "float16", "bfloat16", "float64")
CPU_DEFAULT_KV_BYTES = 2 << 30
"""The KV cache's size on a CPU device when none is configured."""


def resolve_device(device: str | None) -> torch.device:
    """`None`/`auto` picks CUDA when present, else the CPU."""
    import torch  # here, not at the top: the scheduler and the simulator read this module without torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/`auto` means bf16 on CUDA; on the CPU, bf16 where the CPU runs it faster (AMX or AVX-512 BF16, checked by
    a measurement at start-up: models.linear.preferred_cpu_dtype), else fp32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        from omniserve.models.linear import preferred_cpu_dtype

        return preferred_cpu_dtype()
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    return getattr(torch, dtype)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache on the device."""

    page_size: int = 16
    """Tokens per KV page (vLLM's --block-size)."""
    num_pages: int | None = None
    """Exact number of pages; overrides the memory-based sizing (vLLM's --num-gpu-blocks-override)."""
    kv_cache_memory_bytes: int | None = None
    """Bytes for the KV cache; default: 90% of free GPU memory on CUDA, 2 GiB on the CPU."""
    gpu_memory_utilization: float | None = None
    """Share of the memory budget (the GPU's memory; on the CPU, the memory available at start-up) that the weights,
    the activations and the KV cache may take together; the KV cache gets what the others leave. Used when neither
    num_pages nor kv_cache_memory_bytes is given (as in vLLM)."""

    def __post_init__(self) -> None:
        if self.page_size <= 0:
            raise ConfigError(f"page_size must be positive, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ConfigError(f"num_pages must be positive, got {self.num_pages}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
