"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2), split into dense parts and attention.

A decoder layer never calls attention itself. It offers the two dense halves around it:

    hidden --pre_attention--> (q, k, v)          [norm, fused QKV GEMM (+bias), RoPE with per-batch angles]
    (attn_out, hidden) --post_attention--> hidden [o_proj, residual, norm, SwiGLU MLP, residual]

so a runner can run each half on a different set of rows at each layer (layer-wise batching), and route the
attention in between to the device's paged KV cache or elsewhere. All tensors are flat token rows:
hidden [num_tokens, hidden_size], q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from omniserve import ops
from omniserve.config import ModelConfig, RopeScaling
from omniserve.models.linear import Linear, linear, linear_float_out


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 whatever the model dtype, as the reference implementations do (ops/reference.py).
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """fp32 inverse frequencies [head_dim // 2], with Llama-3 or linear scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a cos/sin table for every position up to max_positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # fp32, as the reference computes the angles; the rotation is computed in fp32 too (fp64 for fp64 models).
        self.register_buffer("cos", angles.cos(), persistent=False)  # [max_positions, head_dim // 2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [num_tokens, head_dim // 2] for these positions: computed once per batch, used by every layer."""
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return self.cos[positions].to(angle_dtype), self.sin[positions].to(angle_dtype)


class LayerWeights(NamedTuple):
    """A decoder layer's tensors, as the layer functions below take them. A caller that runs the layers every step
    (engine/graphs.py) fetches them once: looking them up through the modules costs more than a decode step's
    small ops do."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def layer_pre_attention(c: ModelConfig, w: LayerWeights, hidden: torch.Tensor,
                        rope_angles: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm + QKV projection + RoPE. `hidden` itself is the residual that layer_post_attention needs."""
    qkv = linear(ops.rms_norm(hidden, w.input_norm, c.rms_norm_eps), w.qkv, w.qkv_bias)
    ops.rope_(qkv, *rope_angles, c.num_heads, c.num_kv_heads, c.head_dim)
    q, k, v = qkv.split_with_sizes((c.q_size, c.kv_size, c.kv_size), dim=-1)
    return (q.view(-1, c.num_heads, c.head_dim), k.view(-1, c.num_kv_heads, c.head_dim),
            v.view(-1, c.num_kv_heads, c.head_dim))


def layer_post_attention(c: ModelConfig, w: LayerWeights, attn_out: torch.Tensor, residual: torch.Tensor
                         ) -> torch.Tensor:
    """Output projection + residual, then norm + SwiGLU MLP + residual. attn_out: [num_tokens, num_heads, head_dim].
    Five ops: the residual additions ride on the projections' GEMMs."""
    hidden = linear(attn_out.reshape(attn_out.shape[0], -1), w.o, residual=residual)
    activated = ops.silu_and_mul(linear(ops.rms_norm(hidden, w.post_norm, c.rms_norm_eps), w.gate_up))
    return linear(activated, w.down, residual=hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Q, K and V in one GEMM; gate and up in one GEMM (the loader concatenates the checkpoint's matrices).
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def weights(self) -> LayerWeights:
        return LayerWeights(self.input_layernorm.weight, self.qkv_proj.weight, self.qkv_proj.bias, self.o_proj.weight,
                            self.post_attention_layernorm.weight, self.gate_up_proj.weight, self.down_proj.weight)

    def pre_attention(self, hidden: torch.Tensor, rope_angles: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return layer_pre_attention(self.config, self.weights(), hidden, rope_angles)

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return layer_post_attention(self.config, self.weights(), attn_out, residual)


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""attend(layer_index, q, k, v) -> attention output [num_tokens, num_heads, head_dim]."""


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for a batch's positions; pass the rows of it that each layer's batch holds."""
        return self.rope.angles(positions, self.embed_tokens.weight.dtype)

    def pre_attention(self, layer: int, hidden: torch.Tensor, rope_angles: tuple[torch.Tensor, torch.Tensor]):
        return self.layers[layer].pre_attention(hidden, rope_angles)

    def post_attention(self, layer: int, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].post_attention(attn_out, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows that sample; logits in fp32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear_float_out(self.norm(hidden), weight)

    def run_layers(self, hidden: torch.Tensor, rope_angles: tuple[torch.Tensor, torch.Tensor], attend: Attend,
                   layers: Sequence[LayerWeights] | None = None) -> torch.Tensor:
        """Every row of `hidden` through every layer, `attend` giving each layer's attention (the all-device path).
        `layers`: the layers' tensors, fetched once by a caller that runs them every step (else fetched now)."""
        config = self.config
        for index, weights in enumerate(layers or [layer.weights() for layer in self.layers]):
            q, k, v = layer_pre_attention(config, weights, hidden, rope_angles)
            hidden = layer_post_attention(config, weights, attend(index, q, k, v), hidden)
        return hidden

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Every row through every layer (the all-device path). Returns the last hidden states."""
        return self.run_layers(self.embed(token_ids), self.rope_angles(positions), attend)
