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
