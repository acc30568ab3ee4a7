"""What the simulator simulates: a model served on some hardware, as a SystemProfile.

Two kinds of profile:

- analytic (`analytic_profile`): a roofline model of a GPU server from the model's shape and the published peak
  numbers of the hardware (hardware/*.toml), each scaled by an efficiency factor that the TOML file states and
  explains (the parts are in roofline.py). It gives the paper's testbeds (A100s over PCIe, a Xeon CPU server) and
  memory-tight deployments (an 8B model on a 24 GB L4, a 70B model in FP8 on two H100s) without having them.
- measured (`measured_profile`): this machine's latency model as `omniserve profile` measured it.

`get_profile("llama-2-70b@a100x4", num_cpu_hosts=3)` resolves the names the command line uses (`list_profiles()`);
`describe(profile)` prints a few numbers to sanity-check one.

Every time here is in seconds, every size in bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from omniserve.config import CPU_DEFAULT_KV_BYTES, ModelConfig
from omniserve.engine.scheduler.latency_model import (
    BatchShape, LatencyModel, LinearModel, PiecewiseLinear, prefill_interactions,
)
from omniserve.simulator.roofline import (
    GPU_DTYPE_BYTES, WEIGHT_DTYPES, cpu_attention_model, cpu_workers, decode_attention_model, dense_model,
    gemm_peak_flops, hardware_spec, head_model, kv_bytes_per_token_per_layer, list_hardware, list_models,
    model_config, prefill_attention_model, row_bytes_per_layer, weight_bytes_total,
)

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
    # Memory-tight deployments, where device KV rather than device time can bind best-effort throughput.
    "llama-3-8b@l4": dict(model="llama-3-8b", hardware="l4-24gb", tp=1),
    "llama-3-8b@a100-40gb": dict(model="llama-3-8b", hardware="a100-40gb", tp=1),
    # bf16 weights (~141 GB) would leave 2 x 80 GB almost no KV room: FP8 weights, bf16 KV, as vLLM users serve it.
    "llama-3-70b-fp8@h100x2": dict(model="llama-3-70b", hardware="h100-80gb", tp=2, weight_bytes=1),
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


# -------------------------------------------------------------------------------------------------- profiles
def device_kv_bytes(cfg: ModelConfig, gpu: dict, tp: int, weight_bytes: int = GPU_DTYPE_BYTES) -> float:
    """Room for KV on the TP group: each GPU's usable share of its memory less its activation reserve, less the
    weights (sharded over the group). Negative when the weights do not fit."""
    memory = gpu["memory"]
    per_gpu = memory["usable_fraction"] * gpu["peak"]["memory_bytes"] - memory["activation_reserve_bytes"]
    return tp * per_gpu - weight_bytes_total(cfg, weight_bytes)


def _check_deployment(model: str, cfg: ModelConfig, tp: int, weight_bytes: int, num_cpu_hosts: int) -> None:
    if tp < 1 or cfg.num_kv_heads % tp or cfg.num_heads % tp:
        raise ValueError(f"tp={tp} must divide {model}'s {cfg.num_heads} heads and {cfg.num_kv_heads} KV heads")
    if weight_bytes not in WEIGHT_DTYPES:
        raise ValueError(f"weight_bytes must be one of {sorted(WEIGHT_DTYPES)} (fp8, bf16), got {weight_bytes}")
    if num_cpu_hosts < 1:
        raise ValueError("num_cpu_hosts must be >= 1 (the GPU server's own CPU)")


def _analytic_metadata(model: str, hardware: str, gpu: dict, cpu_host: str, cpu: dict, tp: int,
                       weight_bytes: int) -> dict[str, str]:
    memory = gpu["memory"]
    return {
        "kind": "analytic (roofline)",
        "model": model, "device": hardware, "device_name": gpu["description"], "dtype": "bfloat16",
        "weight_dtype": WEIGHT_DTYPES[weight_bytes] + ("" if weight_bytes == GPU_DTYPE_BYTES else
                                                       " (decoder layers; embedding and LM head bfloat16)"),
        "gemm_peak_flops": f"{gemm_peak_flops(gpu, weight_bytes):.4g}",
        "tp": str(tp), "cpu_host": f"{cpu_host} ({cpu['description']})",
        "cpu_workers_per_host": str(cpu_workers(cpu)),
        "efficiency": ", ".join(f"{k}={v}" for k, v in gpu["efficiency"].items()),
        "cpu_efficiency": ", ".join(f"{k}={v}" for k, v in cpu["efficiency"].items()),
        "dense": "per layer and shard: overhead + max(GEMM FLOPs, weight read) + 2 all-reduces; no wave steps",
        "device_kv": f"tp x ({memory['usable_fraction']} x memory - activation reserve) - weights",
        "host_kv": f"{cpu['pool']['kv_memory_fraction']} of one host's memory",
        "swap": "swap_out 0 (asynchronous CUDA copies); PCIe bandwidth is the TP group's links together",
        "instances": ("one of two TP2 instances on the 4 GPUs" if model.lower() == "yi-34b" and tp == 2
                      else "one instance"),
    }


def analytic_profile(model: str, hardware: str, num_cpu_hosts: int = 1, cpu_host: str = DEFAULT_CPU_HOST,
                     tp: int | None = None, weight_bytes: int = GPU_DTYPE_BYTES) -> SystemProfile:
    """A roofline profile of `model` on `tp` GPUs of `hardware` (a hardware/*.toml name), with `num_cpu_hosts` CPU
    hosts of `cpu_host` for CPU attention (the GPU server's own first; all assumed the same CPU). The decoder layers'
    weights take `weight_bytes` each (1: FP8, 2: bf16); KV and activations are bf16 either way."""
    cfg = model_config(model)
    gpu, cpu = hardware_spec(hardware, "gpu"), hardware_spec(cpu_host, "cpu")
    tp = tp or DEFAULT_TP.get(model.lower(), 1)
    _check_deployment(model, cfg, tp, weight_bytes, num_cpu_hosts)
    kv_per_token = cfg.num_layers * kv_bytes_per_token_per_layer(cfg, GPU_DTYPE_BYTES)
    kv_memory = device_kv_bytes(cfg, gpu, tp, weight_bytes)
    if kv_memory < kv_per_token:
        raise ValueError(f"{model} ({WEIGHT_DTYPES[weight_bytes]} weights) does not fit on {tp} x {hardware} with "
                         "room for KV")
    latency = LatencyModel(
        num_layers=cfg.num_layers,
        dense=dense_model(cfg, gpu, tp, weight_bytes),
        prefill_attention=prefill_attention_model(cfg, gpu, tp),
        decode_attention=decode_attention_model(cfg, gpu, tp),
        head=head_model(cfg, gpu, tp),  # the LM head stays bf16
        cpu_attention=cpu_attention_model(cfg, cpu),
        swap_out=LinearModel(0.0, (0.0,)),  # CUDA copies run on their own stream: no engine time
        metadata=_analytic_metadata(model, hardware, gpu, cpu_host, cpu, tp, weight_bytes),
    )
    host = cpu["peak"]
    quantized = "" if weight_bytes == GPU_DTYPE_BYTES else f"-{WEIGHT_DTYPES[weight_bytes]}"
    return SystemProfile(
        name=f"{model}{quantized}-tp{tp} on {hardware}-x{tp} + {num_cpu_hosts} x {cpu_host}",
        latency=latency,
        num_layers=cfg.num_layers,
        kv_bytes_per_token=kv_per_token,
        device_kv_tokens=int(kv_memory // kv_per_token),
        host_kv_tokens=int(host["memory_bytes"] * cpu["pool"]["kv_memory_fraction"] // kv_per_token),
        cpu_workers_per_host=cpu_workers(cpu),
        num_cpu_hosts=num_cpu_hosts,
        pcie_bytes_per_s=tp * gpu["peak"]["pcie_bytes_per_s"],  # each GPU copies its shard over its own link
        network_bytes_per_s=host["network_bytes_per_s"] * cpu["efficiency"]["network_bandwidth"],
        network_latency_s=host["network_latency_s"],
        row_bytes_per_layer=row_bytes_per_layer(cfg, GPU_DTYPE_BYTES),
        tp=tp,
    )


def cpu_instance_profile(model: str, cpu_host: str = DEFAULT_CPU_HOST) -> SystemProfile:
    """`model` served whole on one CPU host (bf16 weights and KV in its memory), as the OmniServe paper's Llumnix
    baseline runs the BE requests its GPU headroom leaves out: a GPU-style roofline (roofline.py) on the host's
    published peaks and its `whole_model` efficiency factors. Its KV is what the host's pool share of memory holds
    beside the weights. There is no CPU pool behind it."""
    cfg = model_config(model)
    cpu = hardware_spec(cpu_host, "cpu")
    peak, whole = cpu["peak"], cpu["whole_model"]
    as_gpu = {  # the host in the shape the GPU rooflines read; one "GPU", so no interconnect
        "peak": {"bf16_flops": peak["fp32_flops"], "memory_bytes_per_s": peak["memory_bytes_per_s"]},
        "efficiency": {k: whole[k] for k in ("gemm_flops", "weight_bandwidth", "prefill_attention_flops",
                                             "decode_attention_bandwidth")},
        "overhead": {k: whole[k] for k in ("iteration_s", "layer_s", "attention_kernel_s",
                                           "decode_attention_per_request_s")},
    }
    kv_per_token = cfg.num_layers * kv_bytes_per_token_per_layer(cfg, GPU_DTYPE_BYTES)
    kv_memory = peak["memory_bytes"] * cpu["pool"]["kv_memory_fraction"] - weight_bytes_total(cfg)
    if kv_memory < kv_per_token:
        raise ValueError(f"{model} does not fit in {cpu_host}'s memory with room for KV")
    latency = LatencyModel(
        num_layers=cfg.num_layers, dense=dense_model(cfg, as_gpu, 1), prefill_attention=prefill_attention_model(
            cfg, as_gpu, 1), decode_attention=decode_attention_model(cfg, as_gpu, 1), head=head_model(cfg, as_gpu, 1),
        cpu_attention=cpu_attention_model(cfg, cpu), metadata={
            "kind": "analytic (roofline)", "model": model, "device": cpu_host, "device_name": cpu["description"],
            "dtype": "bfloat16", "instance": "the whole model on one CPU host (no GPU)"})
    return SystemProfile(
        name=f"{model} whole on {cpu_host}", latency=latency, num_layers=cfg.num_layers,
        kv_bytes_per_token=kv_per_token, device_kv_tokens=int(kv_memory // kv_per_token), host_kv_tokens=1,
        cpu_workers_per_host=1, num_cpu_hosts=1, pcie_bytes_per_s=peak["memory_bytes_per_s"],
        network_bytes_per_s=peak["network_bytes_per_s"], network_latency_s=peak["network_latency_s"],
        row_bytes_per_layer=row_bytes_per_layer(cfg, GPU_DTYPE_BYTES))


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
    from omniserve.config import cache_dir

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
    defaults = hardware_spec("this-machine", "measured")["defaults"]
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
    """A profile by name; keywords go to analytic_profile (num_cpu_hosts, cpu_host, tp, weight_bytes) or
    measured_profile."""
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
    """A few numbers to sanity-check a profile. The large decode batch is 64 requests, or as many as the device KV
    holds at `context` when that is fewer (a batch that could not run would say nothing)."""
    latency = profile.latency
    cpu = latency.cpu_attention_time(context, 1)
    device = latency.decode_attention_time(context, 1)
    profiled_rows = int(latency.metadata.get("max_num_tokens", 1 << 30))
    extrapolated = f" (extrapolated beyond the {profiled_rows} profiled rows)" if profiled_rows < 2048 else ""
    fit = profile.device_kv_tokens // context
    batch = max(1, min(64, fit))
    return "\n".join([
        profile.name,
        f"  decode step at context {context}: batch 1 {_ms(profile.decode_step_time(1, context))}, "
        f"batch {batch} {_ms(profile.decode_step_time(batch, context))}" + (" (all the device KV holds)" * (fit < 64)),
        f"  prefill of 2048 tokens: {_ms(profile.prefill_time(2048))}{extrapolated}",
        f"  device KV: {profile.device_kv_tokens:,} tokens of {profile.kv_bytes_per_token / 1024:.0f} KiB "
        f"({fit:,} requests at context {context}); host KV: {profile.host_kv_tokens:,} tokens per host x "
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
    gpu, cpu = hardware_spec(hardware, "gpu"), hardware_spec(cpu_host, "cpu")
    gpu_seconds = decode_attention_model(cfg, gpu, tp=1)(batch * context, batch)
    busy = min(batch, cpu_workers(cpu))
    rows = math.ceil(batch / busy)  # the busiest worker's share decides when the host is done
    cpu_seconds = cpu_attention_model(cfg, cpu)(rows * context, rows)
    return cpu_seconds / gpu_seconds
