"""What the simulator simulates: a model served on some hardware, as a SystemProfile.

Two kinds of profile:

- analytic (`analytic_profile`): a roofline model of a GPU server from the model's shape and the published peak
  numbers of the hardware (hardware/*.toml), each scaled by an efficiency factor that the TOML file states and
  explains. It gives the paper's testbeds (A100s over PCIe, a Xeon CPU server) without having them.
- measured (`measured_profile`): this machine's latency model as `omniserve profile` measured it.

`get_profile("llama-2-70b@a100x4", num_cpu_hosts=3)` resolves the names the command line uses (`list_profiles()`);
`describe(profile)` prints a few numbers to sanity-check one.

Every time here is in seconds, every size in bytes.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from omniserve.config import CPU_DEFAULT_KV_BYTES, ModelConfig
from omniserve.engine.scheduler.latency_model import (
    BatchShape, LatencyModel, LinearModel, PiecewiseLinear, prefill_interactions,
)
from omniserve.models.hf_config import config_from_hf
from omniserve.models.presets import PRESETS

HARDWARE_DIR = Path(__file__).parent / "hardware"
GPU_DTYPE_BYTES = 2  # bf16 weights, activations and KV on every GPU profile
DEFAULT_CPU_HOST = "xeon-gold-6342"

DEFAULT_TP = {"llama-2-70b": 4, "yi-34b": 2, "llama-3-8b": 1, "smollm2-135m": 1}
"""The paper's tensor-parallel degree per model (smaller models fit one GPU)."""

_NAMED: dict[str, dict | None] = {
    "llama-2-70b@a100x4": dict(model="llama-2-70b", hardware="a100-80gb", tp=4),
    # The paper runs two TP2 instances of Yi-34B on its 4 GPUs; one instance is simulated (half of the GPUs).
    "yi-34b@a100x4": dict(model="yi-34b", hardware="a100-80gb", tp=2),
    "llama-3-8b@h100": dict(model="llama-3-8b", hardware="h100-80gb", tp=1),
    "smollm2-135m@h100": dict(model="smollm2-135m", hardware="h100-80gb", tp=1),
    "llama-3-8b@a100": dict(model="llama-3-8b", hardware="a100-80gb", tp=1),
    "smollm2-135m@this-machine": None,  # measured
}


@dataclass(frozen=True)
class SystemProfile:
    name: str
    """e.g. "llama-2-70b-tp4 on a100-80gb-x4 + 1 x xeon-gold-6342"."""
    latency: LatencyModel
    """Device iteration parts per layer (for one TP shard, all shards running in parallel), plus `cpu_attention`:
    ONE CPU worker's time for one layer's batch f(total_context, num_rows), round trip within the host included."""
    num_layers: int
    kv_bytes_per_token: int
    """All layers, K and V, at the serving dtype: the whole model's KV of one token (summed over TP shards)."""
    device_kv_tokens: int
    """Tokens of KV that fit on the device(s) after weights and activations."""
    host_kv_tokens: int
    """Tokens of KV that fit in ONE CPU host's memory given to the pool."""
    cpu_workers_per_host: int
    num_cpu_hosts: int
    """1 = the GPU server's own CPU only; 1 + N with N remote CPU-only servers."""
    pcie_bytes_per_s: float
    """Host <-> device copy bandwidth for swap-out / swap-in (all the TP group's links together)."""
    network_bytes_per_s: float
    network_latency_s: float
    """One way, between hosts."""
    row_bytes_per_layer: int
    """Bytes sent to a CPU worker per offloaded row per layer (q, k, v of the new token) plus the output returned."""
    tp: int = 1
    """Tensor-parallel degree of the device group."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_bytes_per_token", "device_kv_tokens", "host_kv_tokens", "cpu_workers_per_host",
                     "num_cpu_hosts", "row_bytes_per_layer", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile {self.name}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("pcie_bytes_per_s", "network_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"profile {self.name}: {name} must be positive")
        if self.network_latency_s < 0:
            raise ValueError(f"profile {self.name}: network_latency_s must be >= 0")
        if self.latency.num_layers != self.num_layers:
            raise ValueError(f"profile {self.name}: the latency model has {self.latency.num_layers} layers, "
                             f"the profile {self.num_layers}")

    def decode_step_time(self, batch: int, context: int) -> float:
        """One iteration of `batch` device decode rows, each at `context`."""
        return self.latency.iteration_time(
            BatchShape(num_rows=batch, decode_context=batch * context, num_decodes=batch, num_sampled=batch))

    def prefill_time(self, tokens: int) -> float:
        """One iteration that prefills a `tokens`-token prompt alone, in one chunk."""
        return self.latency.iteration_time(BatchShape(
            num_rows=tokens, prefill_interactions=prefill_interactions(0, tokens), num_sampled=1,
            prefill_tokens=tokens))


# ---------------------------------------------------------------------------------------------------- inputs
def list_models() -> list[str]:
    return sorted(PRESETS)


def model_config(model: str) -> ModelConfig:
    """The shape of a model by name, from presets.py."""
    shape = PRESETS.get(model.lower())
    if shape is None:
        raise ValueError(f"unknown model {model!r} (known: {', '.join(list_models())})")
    return config_from_hf(shape)


def list_hardware() -> list[str]:
    return sorted(path.stem for path in HARDWARE_DIR.glob("*.toml"))


def load_hardware(name: str) -> dict:
    """A hardware file's tables, by its name (the file's stem)."""
    path = HARDWARE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown hardware {name!r} (known: {', '.join(list_hardware())})")
    with path.open("rb") as f:
        return tomllib.load(f)


def _hardware(name: str, kind: str) -> dict:
    spec = load_hardware(name)
    if spec.get("kind") != kind:
        raise ValueError(f"hardware {name!r} is a {spec.get('kind')!r}, not a {kind!r}")
    return spec


# ---------------------------------------------------------------------------------------------- model sizes
def layer_parameters(cfg: ModelConfig) -> int:
    """Weights of one decoder layer: QKV, O, the SwiGLU MLP and two norms."""
    return (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size)


def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype_bytes: int) -> int:
    return 2 * cfg.kv_size * dtype_bytes


def row_bytes_per_layer(cfg: ModelConfig, dtype_bytes: int) -> int:
    """q, k and v of a row's new token to its CPU worker, and the attention output back."""
    return (2 * cfg.q_size + 2 * cfg.kv_size) * dtype_bytes


# -------------------------------------------------------------------------------------------- analytic parts
def _dense(cfg: ModelConfig, gpu: dict, tp: int) -> PiecewiseLinear:
    """One layer on one TP shard: the roofline max(GEMM FLOPs, weight read) plus the layer's two all-reduces.

    Every term is linear in the rows on either side of the roofline's knee, so knots at powers of two plus the knee
    follow it exactly. Not modelled: a GEMM's steps as rows add waves of thread blocks, elementwise kernels' traffic.
    """
    peak, eff, over = gpu["peak"], gpu["efficiency"], gpu["overhead"]
    flops_per_row = 2 * layer_parameters(cfg) / tp
    seconds_per_row = flops_per_row / (peak["bf16_flops"] * eff["gemm_flops"])
    weight_read = layer_parameters(cfg) * GPU_DTYPE_BYTES / tp / (peak["memory_bytes_per_s"] * eff["weight_bandwidth"])

    def seconds(n: float) -> float:
        allreduce = 0.0
        if tp > 1:  # after attention's O projection and after the MLP; a ring moves 2 (tp - 1) / tp of the data
            data = n * cfg.hidden_size * GPU_DTYPE_BYTES * 2 * (tp - 1) / tp
            allreduce = 2 * (peak["interconnect_latency_s"]
                             + data / (peak["interconnect_bytes_per_s"] * eff["allreduce_bandwidth"]))
        return over["layer_s"] + max(n * seconds_per_row, weight_read) + allreduce

    knee = weight_read / seconds_per_row
    xs = sorted({float(2 ** i) for i in range(15)} | {knee})
    return PiecewiseLinear(tuple(xs), tuple(seconds(x) for x in xs))


def _prefill_attention(cfg: ModelConfig, gpu: dict, tp: int) -> LinearModel:
    """One layer, one shard: QK^T and PV are 2 FLOPs per multiply-add each, per query head, per interaction; per
    token, its q, k, v and output cross HBM once."""
    peak, eff, over = gpu["peak"], gpu["efficiency"], gpu["overhead"]
    per_interaction = 4 * cfg.head_dim * cfg.num_heads / tp / (peak["bf16_flops"] * eff["prefill_attention_flops"])
    per_token = row_bytes_per_layer(cfg, GPU_DTYPE_BYTES) / tp / (
        peak["memory_bytes_per_s"] * eff["decode_attention_bandwidth"])
    return LinearModel(over["attention_kernel_s"], (per_interaction, per_token))


def decode_attention_model(cfg: ModelConfig, gpu: dict, tp: int) -> LinearModel:
    """One layer, one shard: reading the context's KV is the cost (GQA attention is far below a GPU's FLOP/byte)."""
    peak, eff, over = gpu["peak"], gpu["efficiency"], gpu["overhead"]
    per_context_token = kv_bytes_per_token_per_layer(cfg, GPU_DTYPE_BYTES) / tp / (
        peak["memory_bytes_per_s"] * eff["decode_attention_bandwidth"])
    return LinearModel(over["attention_kernel_s"], (per_context_token, over["decode_attention_per_request_s"]))


def _head(cfg: ModelConfig, gpu: dict, tp: int) -> LinearModel:
    """Per iteration: the fixed overhead and the LM head's weight read; per sampled row: its LM-head FLOPs and, with
    TP, gathering its fp32 logits from the shards. A linear model adds the weight read and the FLOPs where a roofline
    would take their max: an overestimate of at most 2x near the knee, on a small part of an iteration."""
    peak, eff, over = gpu["peak"], gpu["efficiency"], gpu["overhead"]
    lm_head = cfg.vocab_size * cfg.hidden_size
    fixed = over["iteration_s"] + lm_head * GPU_DTYPE_BYTES / tp / (
        peak["memory_bytes_per_s"] * eff["weight_bandwidth"])
    per_row = 2 * lm_head / tp / (peak["bf16_flops"] * eff["gemm_flops"])
    if tp > 1:
        per_row += cfg.vocab_size * 4 * (tp - 1) / tp / (
            peak["interconnect_bytes_per_s"] * eff["allreduce_bandwidth"])
    return LinearModel(fixed, (per_row,))


def cpu_workers(cpu: dict) -> int:
    return max(1, cpu["peak"]["cores"] // cpu["pool"]["cores_per_worker"])


def cpu_attention_model(cfg: ModelConfig, cpu: dict, dtype_bytes: int = GPU_DTYPE_BYTES) -> LinearModel:
    """ONE worker's batch for one layer (all heads: a CPU worker is not tensor-parallel).

    Per context token the roofline max of the KV read and the FLOPs, at the worker's share of the host (workers
    share the memory bus, so under load each gets 1/workers of it); per row a fixed cost; per batch the round trip.
    """
    peak, eff, over = cpu["peak"], cpu["efficiency"], cpu["overhead"]
    workers = cpu_workers(cpu)
    read = kv_bytes_per_token_per_layer(cfg, dtype_bytes) / (
        peak["memory_bytes_per_s"] * eff["attention_bandwidth"] / workers)
    compute = 4 * cfg.head_dim * cfg.num_heads / (peak["fp32_flops"] * eff["attention_flops"] / workers)
    return LinearModel(over["round_trip_s"], (max(read, compute), over["per_row_s"]))


# -------------------------------------------------------------------------------------------------- profiles
def analytic_profile(model: str, hardware: str, num_cpu_hosts: int = 1, cpu_host: str = DEFAULT_CPU_HOST,
                     tp: int | None = None) -> SystemProfile:
    """A roofline profile of `model` on `tp` GPUs of `hardware` (a hardware/*.toml name), with `num_cpu_hosts` CPU
    hosts of `cpu_host` for CPU attention (the GPU server's own first; all assumed the same CPU)."""
    cfg = model_config(model)
    gpu, cpu = _hardware(hardware, "gpu"), _hardware(cpu_host, "cpu")
    tp = tp or DEFAULT_TP.get(model.lower(), 1)
    if tp < 1 or cfg.num_kv_heads % tp or cfg.num_heads % tp:
        raise ValueError(f"tp={tp} must divide {model}'s {cfg.num_heads} heads and {cfg.num_kv_heads} KV heads")
    if num_cpu_hosts < 1:
        raise ValueError("num_cpu_hosts must be >= 1 (the GPU server's own CPU)")

    kv_per_token = cfg.num_layers * kv_bytes_per_token_per_layer(cfg, GPU_DTYPE_BYTES)
    memory = gpu["memory"]
    weights = cfg.num_parameters() * GPU_DTYPE_BYTES
    kv_memory = tp * (memory["usable_fraction"] * gpu["peak"]["memory_bytes"] - memory["activation_reserve_bytes"])
    kv_memory -= weights
    if kv_memory < kv_per_token:
        raise ValueError(f"{model} does not fit on {tp} x {hardware} with room for KV")
    workers = cpu_workers(cpu)
    latency = LatencyModel(
        num_layers=cfg.num_layers,
        dense=_dense(cfg, gpu, tp),
        prefill_attention=_prefill_attention(cfg, gpu, tp),
        decode_attention=decode_attention_model(cfg, gpu, tp),
        head=_head(cfg, gpu, tp),
        cpu_attention=cpu_attention_model(cfg, cpu),
        swap_out=LinearModel(0.0, (0.0,)),  # CUDA copies run on their own stream: no engine time
        metadata={
            "kind": "analytic (roofline)",
            "model": model, "device": hardware, "device_name": gpu["description"], "dtype": "bfloat16",
            "tp": str(tp), "cpu_host": f"{cpu_host} ({cpu['description']})",
            "cpu_workers_per_host": str(workers),
            "efficiency": ", ".join(f"{k}={v}" for k, v in gpu["efficiency"].items()),
            "cpu_efficiency": ", ".join(f"{k}={v}" for k, v in cpu["efficiency"].items()),
            "dense": "per layer and shard: overhead + max(GEMM FLOPs, weight read) + 2 all-reduces; no wave steps",
            "device_kv": f"tp x ({memory['usable_fraction']} x memory - activation reserve) - weights",
            "host_kv": f"{cpu['pool']['kv_memory_fraction']} of one host's memory",
            "swap": "swap_out 0 (asynchronous CUDA copies); PCIe bandwidth is the TP group's links together",
            "instances": ("one of two TP2 instances on the 4 GPUs" if model.lower() == "yi-34b" and tp == 2
                          else "one instance"),
        },
    )
    host = cpu["peak"]
    return SystemProfile(
        name=f"{model}-tp{tp} on {hardware}-x{tp} + {num_cpu_hosts} x {cpu_host}",
        latency=latency,
        num_layers=cfg.num_layers,
        kv_bytes_per_token=kv_per_token,
        device_kv_tokens=int(kv_memory // kv_per_token),
        host_kv_tokens=int(host["memory_bytes"] * cpu["pool"]["kv_memory_fraction"] // kv_per_token),
        cpu_workers_per_host=workers,
        num_cpu_hosts=num_cpu_hosts,
        pcie_bytes_per_s=tp * gpu["peak"]["pcie_bytes_per_s"],  # each GPU copies its shard over its own link
        network_bytes_per_s=host["network_bytes_per_s"] * cpu["efficiency"]["network_bandwidth"],
        network_latency_s=host["network_latency_s"],
        row_bytes_per_layer=row_bytes_per_layer(cfg, GPU_DTYPE_BYTES),
        tp=tp,
    )


_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_FEATURES = {"prefill_attention": 2, "decode_attention": 2, "head": 1, "cpu_attention": 2, "swap_out": 1}


def _check_features(latency: LatencyModel, source: Path) -> None:
    """Profiles of an older format load but have other features (a call would fail in the middle of a run)."""
    for part, count in _FEATURES.items():
        if len(getattr(latency, part).slopes) != count:
            raise ValueError(f"{source}: {part} has {len(getattr(latency, part).slopes)} features, not {count} "
                             "(an older profile format): run `omniserve profile --force`")


def extend_dense(dense: PiecewiseLinear, factor: int = 16) -> PiecewiseLinear:
    """The profiled dense model with a knot at `factor` times its last one, on the slope of its last octave.

    Beyond its last knot a PiecewiseLinear extends its last segment, and the bisection's last segment can be a
    couple of rows wide around a noisy step (a measured one rises 7 ms over 2 rows), which extrapolated to a 2048-row
    prefill would predict seconds per layer. The simulator batches more rows than a CPU profile measured (512).
    """
    xs, ys = dense.xs, dense.ys
    if len(xs) < 2 or xs[-1] <= 0:
        return dense
    half = max([x for x in xs[:-1] if x <= xs[-1] / 2], default=xs[0])
    slope = max(0.0, (ys[-1] - dense(half)) / (xs[-1] - half))
    return PiecewiseLinear(xs + (xs[-1] * factor,), ys + (ys[-1] + slope * xs[-1] * (factor - 1),))


_MEASURED_MODEL_PREFIX = "smollm2-135m"
"""Cached profiles of the built-in model: the GGUF file's name (SmolLM2-135M-Instruct...) or the dummy preset's."""


def newest_cached_profile(prefix: str = _MEASURED_MODEL_PREFIX) -> Path:
    """The newest profile in the engine's cache whose file name starts with `prefix` (case-insensitive). Profiles
    whose CPU attention was timed through a real pool come first: the others only time the kernel in-process, a
    lower bound without the pool's round trip."""
    from omniserve.profiler.profiler import cache_dir

    folder = cache_dir() / "profiles"
    candidates = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        if not path.name.lower().startswith(prefix.lower()):
            continue
        try:
            latency = LatencyModel.from_json(path.read_text())
            _check_features(latency, path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written or from an older format
        pooled = latency.metadata.get("cpu_attention") == "pool round trip"
        candidates.append((pooled, path.stat().st_mtime, path))
    if not candidates:
        raise FileNotFoundError(
            f"no cached latency profile of the built-in model in {folder}: run `omniserve profile` first "
            "(or pass the path of a profile JSON)")
    return max(candidates)[2]


def measured_profile(path: str | os.PathLike | None = None, *, model: str = "smollm2-135m",
                     device_kv_tokens: int | None = None, host_kv_tokens: int | None = None,
                     cpu_workers_per_host: int | None = None, num_cpu_hosts: int = 1,
                     pcie_bytes_per_s: float | None = None, network_bytes_per_s: float | None = None,
                     network_latency_s: float | None = None) -> SystemProfile:
    """This machine as `omniserve profile` measured it: the LatencyModel JSON at `path` (default: the newest cached
    profile of the built-in model); what the JSON does not say comes from the arguments, defaulting to the engine's
    own defaults on a CPU device (hardware/this-machine.toml)."""
    source = Path(path) if path is not None else newest_cached_profile()
    latency = LatencyModel.from_json(source.read_text())
    _check_features(latency, source)
    cfg = model_config(model)
    if latency.num_layers != cfg.num_layers:
        raise ValueError(f"{source} has {latency.num_layers} layers; {model} has {cfg.num_layers}")
    defaults = _hardware("this-machine", "measured")["defaults"]
    dtype = latency.metadata.get("dtype", "float32")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"{source}: unknown dtype {dtype!r}")
    kv_per_token = cfg.num_layers * kv_bytes_per_token_per_layer(cfg, _DTYPE_BYTES[dtype])
    if device_kv_tokens is None:
        if not latency.metadata.get("device", "cpu").startswith("cpu"):
            raise ValueError(f"{source} was profiled on {latency.metadata['device']}: pass device_kv_tokens")
        device_kv_tokens = CPU_DEFAULT_KV_BYTES // kv_per_token  # the engine's KV cache on a CPU device
    if host_kv_tokens is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        host_kv_tokens = int(physical * defaults["host_memory_fraction"] // kv_per_token)
    latency = replace(latency, dense=extend_dense(latency.dense), metadata={
        **latency.metadata, "kind": "measured", "source": str(source),
        "dense_extension": f"beyond {latency.dense.xs[-1]:g} rows: the slope of the last profiled octave"})
    return SystemProfile(
        name=f"{model} on this machine ({latency.metadata.get('device_name', 'unknown device')}, {dtype}) "
             f"+ {num_cpu_hosts} host(s)",
        latency=latency,
        num_layers=cfg.num_layers,
        kv_bytes_per_token=kv_per_token,
        device_kv_tokens=device_kv_tokens,
        host_kv_tokens=host_kv_tokens,
        cpu_workers_per_host=cpu_workers_per_host or defaults["cpu_workers_per_host"],
        num_cpu_hosts=num_cpu_hosts,
        pcie_bytes_per_s=pcie_bytes_per_s or defaults["pcie_bytes_per_s"],
        network_bytes_per_s=network_bytes_per_s or defaults["network_bytes_per_s"],
        network_latency_s=defaults["network_latency_s"] if network_latency_s is None else network_latency_s,
        row_bytes_per_layer=row_bytes_per_layer(cfg, _DTYPE_BYTES[dtype]),
    )


def list_profiles() -> list[str]:
    """The names get_profile resolves (any `<model>@<hardware file>` works too, e.g. `llama-3-8b@h100-80gb`)."""
    return list(_NAMED)


def get_profile(name: str, **kw) -> SystemProfile:
    """A profile by name; keywords go to analytic_profile (num_cpu_hosts, cpu_host, tp) or measured_profile."""
    key = name.lower()
    if key in _NAMED:
        spec = _NAMED[key]
        return measured_profile(**kw) if spec is None else analytic_profile(**{**spec, **kw})
    model, _, hardware = key.partition("@")
    if model in list_models() and hardware in list_hardware() and hardware != "this-machine":
        return analytic_profile(model, hardware, **kw)
    raise ValueError(f"unknown profile {name!r} (known: {', '.join(list_profiles())}, or <model>@<hardware> with a "
                     f"model of {', '.join(list_models())} and hardware of {', '.join(list_hardware())})")


# -------------------------------------------------------------------------------------------------- for people
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def describe(profile: SystemProfile, context: int = 1000) -> str:
    latency = profile.latency
    cpu = latency.cpu_attention_time(context, 1)
    device = latency.decode_attention_time(context, 1)
    profiled_rows = int(latency.metadata.get("max_num_tokens", 1 << 30))
    extrapolated = f" (extrapolated beyond the {profiled_rows} profiled rows)" if profiled_rows < 2048 else ""
    return "\n".join([
        profile.name,
        f"  decode step at context {context}: batch 1 {_ms(profile.decode_step_time(1, context))}, "
        f"batch 64 {_ms(profile.decode_step_time(64, context))}",
        f"  prefill of 2048 tokens: {_ms(profile.prefill_time(2048))}{extrapolated}",
        f"  device KV: {profile.device_kv_tokens:,} tokens; host KV: {profile.host_kv_tokens:,} tokens per host x "
        f"{profile.num_cpu_hosts} host(s), {profile.cpu_workers_per_host} CPU worker(s) each",
        f"  one request's attention per layer at context {context}: CPU worker {_ms(cpu)} vs device {_ms(device)} "
        f"({cpu / device:.1f}x)" if device > 0 else "  (no device decode attention)",
    ])


def gpu_cpu_attention_ratio(model: str, hardware: str, cpu_host: str = DEFAULT_CPU_HOST, context: int = 1000,
                            batch: int = 16) -> float:
    """How many times faster ONE GPU runs a decode batch's attention (every head of `batch` requests at `context`,
    one layer) than ONE CPU host with all its workers sharing the batch: the comparison DESIGN.md quotes from the
    paper (Llama-2-70B, A100 vs Xeon Gold 6342, context 1000: 2.3-7.6x)."""
    cfg = model_config(model)
    gpu, cpu = _hardware(hardware, "gpu"), _hardware(cpu_host, "cpu")
    gpu_seconds = decode_attention_model(cfg, gpu, tp=1)(batch * context, batch)
    busy = min(batch, cpu_workers(cpu))
    rows = math.ceil(batch / busy)  # the busiest worker's share decides when the host is done
    cpu_seconds = cpu_attention_model(cfg, cpu)(rows * context, rows)
    return cpu_seconds / gpu_seconds
