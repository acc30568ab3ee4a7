"""The built-in default model (SmolLM2-135M-Instruct GGUF): tokens equal transformers' from the same file, the chat
template and tokenizer come from the GGUF, and text comes out whole (stop strings, multi-byte characters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve.sampling.params import SamplingParams
from omniserve.tokenizer import IncrementalDetokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def hf_default(default_gguf):
    from transformers import AutoModelForCausalLM

    path = Path(default_gguf)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_generations_equal_transformers(default_llm, hf_default):
    prompts = [default_llm.apply_chat_template(chat) for chat in CHATS]
    outputs = default_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = hf_default.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0]
        assert output.outputs[0].token_ids == expected[len(prompt) :].tolist()
    assert "Paris" in outputs[0].outputs[0].text


def _every_position_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits [positions, vocab] of the model's own layers (plain causal attention), the LM head run
    4 rows at a time, as a decode batch of up to FLOAT_OUT_MAX_ROWS rows runs it."""
    import torch.nn.functional as F

    def attend(layer, q, k, v):
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                              enable_gqa=True).transpose(0, 1)

    with torch.no_grad():
        hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), attend)
        return torch.cat([model.compute_logits(hidden[row:row + 4]) for row in range(0, len(token_ids), 4)])


def test_the_model_in_bf16_predicts_as_in_fp32(default_llm):
    """bf16, the default where the CPU runs it faster, changes a greedy choice only where fp32 itself hardly decides:
    over a chat and its answer, teacher-forced, the next-token distributions stay close (mean KL < 0.01; measured
    0.001) and every top-1 that differs was within 0.25 of fp32's top (measured at most 0.06). Greedy text, which one
    such near-tie reroutes, is compared with transformers in fp32 above."""
    from omniserve.models.loader import load_model

    answer = ("The capital of France is Paris. It is known for the Eiffel Tower, its museums such as the Louvre, and "
              "its cafes. Paris has been the capital since the Middle Ages and is home to about two million people.")
    token_ids = default_llm.apply_chat_template(CHATS[0]) + default_llm.tokenizer.encode(answer)
    fp32 = _every_position_logits(default_llm.engine.runner.model, token_ids)
    bf16_model = load_model(None, torch.device("cpu"), torch.bfloat16, 2048).model
    bf16 = _every_position_logits(bf16_model, token_ids)
    assert bf16.dtype == torch.float32
    log_fp32, log_bf16 = fp32.log_softmax(-1), bf16.log_softmax(-1)
    assert (log_fp32.exp() * (log_fp32 - log_bf16)).sum(-1).mean() < 0.01
    top_fp32, top_bf16 = fp32.argmax(-1), bf16.argmax(-1)
    rows = torch.arange(len(token_ids))
    margins = fp32[rows, top_fp32] - fp32[rows, top_bf16]
    assert (margins < 0.25).all(), margins.max()
    assert (top_fp32 == top_bf16).float().mean() > 0.9


def test_chat_template_and_eos_come_from_the_gguf(default_llm):
    ids = default_llm.apply_chat_template(CHATS[0])
    text = default_llm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert default_llm.engine.model_config.eos_token_ids == (2,)
    out = default_llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and "<|im_end|>" not in out.text


def test_stop_string_cuts_and_never_leaks(default_llm):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    full = default_llm.chat(CHATS[0], params, use_tqdm=False)[0].outputs[0].text  # "The capital of France is Paris."
    assert " is " in full
    engine = default_llm.engine
    engine.add_request("s", default_llm.apply_chat_template(CHATS[0]),
                       SamplingParams(temperature=0.0, max_tokens=24, stop=["France is", "never-seen"]))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            assert "France is" not in streamed
            final = out
    completion = final.outputs[0]
    assert completion.text == streamed == full[: full.index("France is")]
    assert completion.finish_reason == "stop" and completion.stop_reason == "France is"


def test_incremental_detokenisation_keeps_multibyte_characters_whole(default_llm):
    tokenizer = default_llm.tokenizer
    text = "Crème brûlée, 你好世界 and 🌊🐙 — naïve café."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=[])
    deltas = []
    for token in ids:
        detok.add_tokens([token])
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_spanning_tokens_is_held_back(default_llm):
    tokenizer = default_llm.tokenizer
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["brown fox"])
    shown = ""
    for token in tokenizer.encode("the quick brown fox jumps", add_special_tokens=False):
        detok.add_tokens([token])
        shown += detok.take_delta(finished=False)
        assert "brown" not in shown or detok.stopped_by
    shown += detok.take_delta(finished=True)
    assert shown == "the quick " and detok.stopped_by == "brown fox"


def test_generate_from_text_prompt(default_llm):
    out = default_llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=5),
                               use_tqdm=False)
    assert out[0].prompt == "The capital of France is" and out[0].outputs[0].text.strip()
