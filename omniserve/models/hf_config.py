"""A model's shape from a Hugging Face config.json (or a preset written like one), without torch: the simulator
reads model shapes this way too."""

from __future__ import annotations

from omniserve.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelLoadError(ValueError):
    """The model cannot be found or is not one we can serve; the message says what to do."""


def config_from_hf(hf: dict, generation_config: dict | None = None) -> ModelConfig:
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"architecture {architecture} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs write rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling_fields = {k: rope[k] for k in RopeScaling.__dataclass_fields__ if k in rope and k != "rope_type"}
    eos = (generation_config or {}).get("eos_token_id", hf.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    use_window = hf.get("use_sliding_window", architecture == "MistralForCausalLM")
    return ModelConfig(
        architecture=architecture,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        head_dim=hf.get("head_dim") or 0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=RopeScaling(rope_type=rope_type, **scaling_fields),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=architecture == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
        sliding_window=hf.get("sliding_window") if use_window else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
