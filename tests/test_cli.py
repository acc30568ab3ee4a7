"""The command line, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omniserve", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def at_once(*calls):
    """The calls' results, the calls made at the same time: each mostly waits on its command, whose start (imports,
    loading the model) leaves the other core idle."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def test_generate_and_chat_with_the_default_model():
    done, chat = at_once(
        partial(run_cli, "generate", "The capital of France is", "--temperature", "0", "--max-tokens", "8"),
        # The answer's text in fp32, as transformers computes it: in bf16 (the default where the CPU runs it faster)
        # the first token's two candidates are 0.02 apart, which the CPU's kernels may order either way
        # (test_default_model compares bf16 with fp32).
        partial(run_cli, "chat", "--temperature", "0", "--max-tokens", "16", "--dtype", "float32",
                stdin="What is the capital of France?\n"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout


def test_bad_arguments_exit_with_a_clear_message(tiny_model_dirs):
    missing, bad_top_p = at_once(
        partial(run_cli, "generate", "hi", "--model", "/no/such/model"),
        partial(run_cli, "generate", "hi", "--model", tiny_model_dirs["llama"][0], "--top-p", "0"))
    assert missing.returncode != 0 and "neither a Hugging Face folder" in missing.stderr
    assert bad_top_p.returncode != 0 and "top_p must be in (0, 1]" in bad_top_p.stderr
