"""Engine configuration: one frozen dataclass per concern, validated when built."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


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


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str | None) -> torch.device:
    """`None`/`auto` picks CUDA when present, else the CPU."""
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
    """`None`/`auto` means bf16 on CUDA and fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache on the device."""

    page_size: int = 16
    """Tokens per KV page (vLLM's --block-size)."""
    num_pages: int | None = None
    """Exact number of pages; overrides the memory-based sizing (vLLM's --num-gpu-blocks-override)."""
    kv_cache_memory_bytes: int | None = None
    """Bytes for the KV cache; default: 90% of free GPU memory on CUDA, 2 GiB on the CPU."""

    def __post_init__(self) -> None:
        if self.page_size <= 0:
            raise ConfigError(f"page_size must be positive, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ConfigError(f"num_pages must be positive, got {self.num_pages}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine iteration."""

    max_num_batched_tokens: int = 2048
    """Token budget of one iteration; longer prefills are chunked."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_model_len: int = 8192
    """Longest prompt + output a request may reach."""
    be_decode_placement: str = "auto"
    """Where BE requests decode: `cpu` offloads each to the CPU pool once its prefill is done, `device` never
    offloads, `auto` offloads when device pages or iteration time run short and brings them back when both are
    plentiful. Only the `omniserve` policy offloads BE requests."""
    policy: str = "omniserve"
    """The scheduling policy (see omniserve.engine.policy): omniserve, or a competitor's for comparison."""
    ls_headroom: float = 0.2
    """`llumnix` policy: the share of device KV pages that BE requests may never hold."""
    iteration_budget_share: float = 0.85
    """The share of the TPOT SLO an iteration is planned to fill; the rest absorbs the latency model's error."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.0 < self.iteration_budget_share <= 1.0:
            raise ConfigError(f"iteration_budget_share must be in (0, 1], got {self.iteration_budget_share}")
        if not 0.0 <= self.ls_headroom < 1.0:
            raise ConfigError(f"ls_headroom must be in [0, 1), got {self.ls_headroom}")
        if self.be_decode_placement not in BE_DECODE_PLACEMENTS:
            raise ConfigError(
                f"be_decode_placement must be one of {', '.join(BE_DECODE_PLACEMENTS)}, got {self.be_decode_placement!r}"
            )


BE_DECODE_PLACEMENTS = ("auto", "cpu", "device")
POLICIES = ("omniserve", "sarathi", "llumnix", "neo", "fcfs")
