"""Model numerics against transformers: tiny random models of every supported architecture, loaded from real
safetensors folders, give the same logits (prefill, chunked prefill, decode) and the same greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from omniserve.models.loader import ModelLoadError
from omniserve.sampling.params import SamplingParams
from conftest import ARCHITECTURES


def paged_logits(llm, token_ids: list[int], chunk_sizes: list[int]) -> torch.Tensor:
    """Logits of every position, computed chunk by chunk through the paged KV cache."""
    engine = llm.engine
    model, attention = engine.runner.model, engine.runner.attention
    engine.page_table.grow("probe", len(token_ids))
    pages = engine.page_table.pages("probe")
    logits, start = [], 0
    try:
        with torch.inference_mode():
            for size in chunk_sizes:
                meta = attention.build_metadata([(start, size, pages)])
                hidden = model(
                    torch.tensor(token_ids[start : start + size]),
                    torch.arange(start, start + size),
                    attend=lambda layer, q, k, v: attention(layer, q, k, v, meta),
                )
                logits.append(model.compute_logits(hidden))
                start += size
    finally:
        engine.page_table.release("probe")
    return torch.cat(logits)


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            next_id = hf_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("chunks", [[40], [16, 16, 8], [30] + [1] * 10], ids=["prefill", "chunked", "decode"])
def test_logits_match_transformers(arch, chunks, tiny_model_dirs, make_llm):
    folder, hf_model = tiny_model_dirs[arch]
    llm = make_llm(folder, dtype="float32", block_size=4)
    token_ids = torch.randint(3, 1000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(paged_logits(llm, token_ids, chunks), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_matches_transformers(arch, tiny_model_dirs, make_llm):
    folder, hf_model = tiny_model_dirs[arch]
    llm = make_llm(folder, dtype="float32", block_size=4, max_num_batched_tokens=24)
    prompts = [[5, 17, 300, 42], list(range(10, 47)), [999] * 9]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 12)
        assert output.outputs[0].finish_reason == "length"


def test_config_of_each_architecture(tiny_model_dirs, make_llm):
    assert make_llm(tiny_model_dirs["qwen2"][0]).engine.model_config.qkv_bias
    llama3 = make_llm(tiny_model_dirs["llama3"][0]).engine.model_config
    assert llama3.rope_scaling.rope_type == "llama3" and llama3.rope_scaling.factor == 8.0
    assert llama3.rope_theta == 500000.0 and not llama3.tie_word_embeddings
    assert make_llm(tiny_model_dirs["llama"][0]).engine.model_config.tie_word_embeddings


def test_sharded_checkpoint_loads(tiny_model_dirs, tmp_path, make_llm):
    _, hf_model = tiny_model_dirs["qwen2"]
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = make_llm(str(tmp_path), dtype="float32")
    token_ids = [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(paged_logits(llm, token_ids, [6]), expected, atol=2e-5, rtol=1e-4)


def test_bad_checkpoints_are_refused(tiny_model_dirs, tmp_path, make_llm):
    with pytest.raises(ModelLoadError, match="neither"):
        make_llm(str(tmp_path / "nowhere"))
    config = json.loads(open(tiny_model_dirs["llama"][0] + "/config.json").read())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not supported"):
        make_llm(str(tmp_path))


def test_missing_tensor_is_reported(tiny_model_dirs, tmp_path, make_llm):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_model_dirs["llama"]
    weights = load_file(folder + "/model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(folder + "/config.json").read())
    with pytest.raises(ModelLoadError, match="lacks"):
        make_llm(str(tmp_path))


def test_random_weights_of_a_named_model(make_llm):
    llm = make_llm("smollm2-135m", load_format="dummy", max_model_len=256)
    assert llm.engine.model_config.num_layers == 30 and llm.tokenizer is None
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
