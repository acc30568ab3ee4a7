"""The analytic parts of a profile: the models' shapes and the hardware files' peak numbers (hardware/*.toml), and
from them the roofline of each part of an iteration (dense layers, prefill and decode attention, the LM head, a CPU
worker's attention). `profiles.analytic_profile` assembles them into a SystemProfile.

Every time here is in seconds, every size in bytes; device parts are per layer and per TP shard.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from omniserve.config import ModelConfig
from omniserve.engine.scheduler.latency_model import LinearModel, PiecewiseLinear
from omniserve.models.hf_config import config_from_hf
from omniserve.models.presets import PRESETS

HARDWARE_DIR = Path(__file__).parent / "hardware"
GPU_DTYPE_BYTES = 2  # bf16 activations and KV on every GPU profile; weights too unless a profile says FP8
WEIGHT_DTYPES = {2: "bfloat16", 1: "fp8"}
"""Bytes per weight of the decoder layers an analytic profile accepts, and their dtype's name."""


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


def hardware_spec(name: str, kind: str) -> dict:
    spec = load_hardware(name)
    if spec.get("kind") != kind:
        raise ValueError(f"hardware {name!r} is a {spec.get('kind')!r}, not a {kind!r}")
    return spec


# ---------------------------------------------------------------------------------------------- model sizes
def layer_parameters(cfg: ModelConfig) -> int:
    """Weights of one decoder layer: QKV, O, the SwiGLU MLP and two norms."""
    return (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size)


def weight_bytes_total(cfg: ModelConfig, weight_bytes: int = GPU_DTYPE_BYTES) -> int:
    """The whole model's weights: the decoder layers' at `weight_bytes` per parameter, the embedding, LM head and
    final norm at bf16 (FP8 checkpoints leave them unquantized). The layers' norms count at `weight_bytes` too: they
    are a millionth of a layer."""
    layers = cfg.num_layers * layer_parameters(cfg)
    return layers * weight_bytes + (cfg.num_parameters() - layers) * GPU_DTYPE_BYTES


def gemm_peak_flops(gpu: dict, weight_bytes: int = GPU_DTYPE_BYTES) -> float:
    """The dense GEMMs' peak: FP8 tensor cores for FP8 weights where the GPU states an FP8 peak (activations quantized
    per token, as vLLM's FP8 path does), else BF16 (a GPU without FP8 widens FP8 weights to BF16 in the GEMM)."""
    peak = gpu["peak"]
    return peak["fp8_flops"] if weight_bytes == 1 and "fp8_flops" in peak else peak["bf16_flops"]


def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype_bytes: int) -> int:
    return 2 * cfg.kv_size * dtype_bytes


def row_bytes_per_layer(cfg: ModelConfig, dtype_bytes: int) -> int:
    """q, k and v of a row's new token to its CPU worker, and the attention output back."""
    return (2 * cfg.q_size + 2 * cfg.kv_size) * dtype_bytes


# -------------------------------------------------------------------------------------------- analytic parts
def dense_model(cfg: ModelConfig, gpu: dict, tp: int, weight_bytes: int = GPU_DTYPE_BYTES) -> PiecewiseLinear:
    """One layer on one TP shard: the roofline max(GEMM FLOPs, weight read) plus the layer's two all-reduces; the
    weights are read at `weight_bytes` each and the GEMMs run at `gemm_peak_flops`.

    Every term is linear in the rows on either side of the roofline's knee, so knots at powers of two plus the knee
    follow it exactly. Not modelled: a GEMM's steps as rows add waves of thread blocks, elementwise kernels' traffic.
    """
    peak, eff, over = gpu["peak"], gpu["efficiency"], gpu["overhead"]
    flops_per_row = 2 * layer_parameters(cfg) / tp
    seconds_per_row = flops_per_row / (gemm_peak_flops(gpu, weight_bytes) * eff["gemm_flops"])
    weight_read = layer_parameters(cfg) * weight_bytes / tp / (peak["memory_bytes_per_s"] * eff["weight_bandwidth"])

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


def prefill_attention_model(cfg: ModelConfig, gpu: dict, tp: int) -> LinearModel:
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


def head_model(cfg: ModelConfig, gpu: dict, tp: int) -> LinearModel:
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
