"""`omniserve eval gsm8k`: answer extraction, prompts and scoring as plain functions; a run against a real in-process
server with a tiny random model (whose answers are garbage, but whose completions must equal transformers' on the
same weights); and a server that fails, which is scored as failures and never crashes the run."""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from omniserve.engine.args import EngineArgs
from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.api_server import build_app, listen_socket
from omniserve.evaluation.cli import add_eval_command
from omniserve.evaluation.gsm8k import (
    DEFAULT_DATA, STOP, EvalError, GSM8KConfig, Problem, accuracy, api_root, build_prompt, cut_at_stop, extract_answer,
    format_solution, is_correct, load_problems, run_gsm8k, score_record, split_problems,
)

SOLUTION = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


needs_gsm8k = pytest.mark.skipif(not DEFAULT_DATA.is_file(),
                                 reason=f"no shared GSM8K data at {DEFAULT_DATA} (OMNISERVE_DATA_DIR)")


def _write_problems(path, count: int) -> str:
    rows = [{"question": f"Question number {i}?", "answer": f"Reasoning {i}.\n#### {i * 10}"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------- plain functions
@pytest.mark.parametrize("completion, expected", [
    (" She makes $18 a day.\n#### 1,234", "1234"),
    ("The answer is $18.", "18"),
    ("no number here", None),
    ("3 + 4 = 7 apples, then 2.50 each", "2.50"),
    ("#### -5\n\nand then 12 more", "-5"),  # the #### answer wins over a later number
    ("####$1,000.00", "1000.00"),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_is_correct_compares_numbers_exactly():
    assert is_correct("18", "18") and is_correct("18.00", "18") and is_correct("$1,234.", "1234")
    assert not is_correct("18.5", "18") and not is_correct(None, "18") and not is_correct("-18", "18")


def test_score_record_and_accuracy():
    problem = Problem(7, "How much?", SOLUTION)
    right = score_record(problem, " 9 * 2 = 18\n#### 18")
    wrong = score_record(problem, " It is 17.")
    failed = score_record(problem, None, "HTTP 500: boom")
    assert right == {"index": 7, "reference": "18", "extracted": "18", "correct": True,
                     "completion": " 9 * 2 = 18\n#### 18", "error": None}
    assert not wrong["correct"] and wrong["extracted"] == "17"
    assert not failed["correct"] and failed["extracted"] is None and failed["error"] == "HTTP 500: boom"
    assert accuracy([right, wrong, failed, right]) == 0.5 and accuracy([]) == 0.0


def test_prompt_shows_exemplars_in_the_classic_format_and_they_are_not_scored(tmp_path):
    problems = load_problems(_write_problems(tmp_path / "p.jsonl", 10))
    shots, scored = split_problems(problems, num_shots=3, limit=4)
    assert [p.index for p in shots] == [0, 1, 2] and [p.index for p in scored] == [3, 4, 5, 6]
    assert [p.index for p in split_problems(problems, 3)[1]] == list(range(3, 10))  # no limit: all the rest
    prompt = build_prompt(shots, scored[0].question)
    assert prompt.startswith("Question: Question number 0?\nAnswer: Reasoning 0.\n#### 0\n\nQuestion: Question")
    assert prompt.endswith("#### 20\n\nQuestion: Question number 3?\nAnswer:")
    assert build_prompt([], "Why?") == "Question: Why?\nAnswer:"
    assert format_solution(SOLUTION) == "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    with pytest.raises(EvalError):
        split_problems(problems, num_shots=10)


@needs_gsm8k
def test_the_shared_data_loads_and_bad_data_is_an_error(tmp_path):
    problems = load_problems()  # the default path: ../shared/data/gsm8k/test.jsonl beside the repository
    assert DEFAULT_DATA.resolve().is_file() and len(problems) == 1319
    assert problems[0].reference == "18" and problems[0].index == 0
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(EvalError, match="bad.jsonl:1"):
        load_problems(tmp_path / "bad.jsonl")
    with pytest.raises(EvalError, match="no GSM8K data"):
        load_problems(tmp_path / "missing.jsonl")


def test_cut_at_stop_and_api_root():
    assert cut_at_stop(" 18\n#### 18\n\nQuestion: next", STOP) == " 18\n#### 18\n\n"
    assert cut_at_stop("a\n\n\nb Question: c", STOP) == "a" and cut_at_stop("plain") == "plain"
    assert api_root("http://h:8000/v1/") == api_root("http://h:8000") == "http://h:8000"


# ---------------------------------------------------------------------------------------------------- a failing server
def _mock_server(handle_completion) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "mock", "object": "model"}]})
        return handle_completion(json.loads(request.content))
    return httpx.MockTransport(handler)


def test_a_server_that_answers_500_gives_failures_not_a_crash(tmp_path):
    transport = _mock_server(lambda body: httpx.Response(500, json={"error": {"message": "boom"}}))
    config = GSM8KConfig(base_url="http://mock", data=_write_problems(tmp_path / "p.jsonl", 10), limit=6, num_shots=2,
                         concurrency=3, progress=False)
    summary, records = run_gsm8k(config, transport=transport)
    assert summary["failed"] == 6 and summary["correct"] == 0 and summary["num_problems"] == 6
    assert summary["model"] == "mock" and summary["accuracy"] == 0.0
    assert all(r["error"].startswith("HTTP 500") and r["completion"] is None for r in records["records"])


@needs_gsm8k
def test_each_failure_kind_is_counted_and_good_answers_still_score():
    def answer(body):
        question = body["prompt"].rsplit("Question: ", 1)[1]
        assert body["temperature"] == 0 and body["stop"] == list(STOP) and body["model"] == "mock"
        if question.startswith("Janet"):  # problem 0, whose reference is 18
            return httpx.Response(200, json={"choices": [{"text": " 16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18"}]})
        if question.startswith("A robe"):
            raise httpx.ReadTimeout("too slow")
        if question.startswith("Josh"):
            return httpx.Response(200, text="not json")
        return httpx.Response(200, json={"choices": [{"text": " 5"}]})

    config = GSM8KConfig(base_url="http://mock/v1", limit=5, num_shots=0, progress=False)
    summary, records = run_gsm8k(config, transport=_mock_server(answer))
    assert (summary["correct"], summary["failed"], summary["num_problems"]) == (1, 2, 5)
    assert [r["correct"] for r in records["records"]] == [True, False, False, False, False]
    assert "ReadTimeout" in records["records"][1]["error"] and records["records"][3]["extracted"] == "5"


def test_a_server_without_models_is_a_clear_error(tmp_path):
    transport = httpx.MockTransport(lambda request: httpx.Response(404))
    data = _write_problems(tmp_path / "p.jsonl", 10)
    with pytest.raises(EvalError, match="cannot list the models"):
        run_gsm8k(GSM8KConfig(base_url="http://mock", data=data, limit=1, progress=False), transport=transport)


# ---------------------------------------------------------------------------------------------------- a real server
def _save_tiny_model(folder) -> None:
    """A tiny random llama as a real HF folder (safetensors), with a word-level tokenizer covering its 1000 ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)

    specials = ["<unk>", "<s>", "</s>"]
    words = "Question Answer : #### . , ? $ the she he how many much is a of and".split() + [str(d) for d in range(10)]
    vocab = specials + words + [f"w{i}" for i in range(1000 - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """(model folder, URL) of the tiny model served by uvicorn on a thread, on a port the OS chose."""
    folder = tmp_path_factory.mktemp("tiny-gsm8k")
    _save_tiny_model(folder)
    # fp32, as transformers runs it: the test compares their texts
    engine = LLMEngine(EngineArgs(model=str(folder), block_size=16, max_num_seqs=8, dtype="float32"))
    app = build_app(engine, ["tiny"])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    sock = listen_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield str(folder), f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    engine.check_integrity()
    assert engine.allocator.num_used == 0


def test_cli_run_against_a_real_server_matches_transformers(tiny_server, tmp_path, capsys):
    folder, url = tiny_server
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    output = tmp_path / "run.json"
    data = _write_problems(tmp_path / "problems.jsonl", 10)
    args = parser.parse_args(["eval", "gsm8k", "--base-url", url, "--data", str(data), "--limit", "4", "--num-shots", "1", "--max-tokens",
                              "8", "--concurrency", "2", "--transformers-model", folder, "--transformers-limit", "3",
                              "--output", str(output), "--no-progress"])
    args.handler(args)
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert len(out.strip().splitlines()) == 1 and "gsm8k: tiny at" in err
    assert {"task", "model", "num_problems", "num_shots", "accuracy", "correct", "failed", "seconds",
            "transformers"} <= summary.keys()
    assert summary["task"] == "gsm8k" and summary["model"] == "tiny" and summary["num_problems"] == 4
    assert summary["failed"] == 0 and summary["num_shots"] == 1 and 0 <= summary["accuracy"] <= 1
    hf = summary["transformers"]
    assert hf["num_problems"] == 3 and hf["identical"] == 3  # same weights, greedy: the same text
    written = json.loads(output.read_text())
    assert {k: written[k] for k in summary} == summary
    assert [r["index"] for r in written["records"]] == [1, 2, 3, 4]
    assert all(r["completion"] and r["error"] is None for r in written["records"])
    server_texts = [r["completion"] for r in written["records"][:3]]
    assert [r["completion"] for r in written["transformers_records"]] == server_texts


def test_eval_is_an_omniserve_subcommand():
    from omniserve.entrypoints.cli import build_parser

    args = build_parser().parse_args(["eval", "gsm8k", "--limit", "3"])
    assert args.limit == 3 and args.num_shots == 5 and args.concurrency == 16 and args.max_tokens == 256
    assert args.base_url == "http://127.0.0.1:8000" and args.transformers_limit == 20
