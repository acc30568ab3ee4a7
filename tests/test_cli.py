"""The command line, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omniserve", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_generate_and_chat_with_the_default_model():
    done = run_cli("generate", "The capital of France is", "--temperature", "0", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    chat = run_cli("chat", "--temperature", "0", "--max-tokens", "16", stdin="What is the capital of France?\n")
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout


def test_bad_arguments_exit_with_a_clear_message(tiny_model_dirs):
    done = run_cli("generate", "hi", "--model", "/no/such/model")
    assert done.returncode != 0 and "neither a Hugging Face folder" in done.stderr
    done = run_cli("generate", "hi", "--model", tiny_model_dirs["llama"][0], "--top-p", "0")
    assert done.returncode != 0 and "top_p must be in (0, 1]" in done.stderr
