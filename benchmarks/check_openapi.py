"""The OpenAPI document against the server: requests generated from /openapi.json by schemathesis (property-based,
both requests the document allows and requests it forbids), sent to `omniserve serve`'s own server over the tests'
tiny llama (random weights, built here; nothing is downloaded), with these checks on every answer:

- not_a_server_error: no 5xx;
- status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance:
  the answer is one the document declares;
- positive_data_acceptance, negative_data_rejection: what the document allows is served, what it forbids is refused
  (a limit the document does not state, or a boolean taken as an integer, fails one of these);
- unsupported_method, allow_header_conformance: a method the path lacks gets 405 with the path's methods in `Allow`.

Prints `5xx: K of N requests; spec mismatches: M of N`, and each failing check by operation; exits 1 if K or M is
not 0. Requests the document allows are kept within what it cannot state (see `keep_servable`): rules between
fields, what only the engine can judge (grammars, tools), a prompt plus max_tokens beyond the context, and an
unknown model name (a 404 the document declares, but one that would leave generation untested); they also ask for
few tokens, so that the run stays short.

    python benchmarks/check_openapi.py                  (needs `pip install schemathesis`)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "positive_data_acceptance",
          "negative_data_rejection", "unsupported_method", "allow_header_conformance")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
RULES_BETWEEN_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                        "guided_grammar", "tools", "tool_choice", "best_of")
"""Fields whose valid values the document cannot state: they are left out of the requests it allows."""
BATCH_LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello"}}\n'
MAX_TOKENS, MAX_N, MAX_PROMPT_IDS, MAX_PROMPTS = 4, 2, 32, 4  # what an allowed request may ask for: a short run


def keep_servable(body: dict, path: str) -> None:
    """A body the document allows, changed in place into one this server serves: the generation routes' rules
    between fields, the engine's own judgements and the context are beyond a JSON schema (see the docstring)."""
    if path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    if body.get("continue_final_message"):
        body["add_generation_prompt"] = False
    for name in RULES_BETWEEN_FIELDS:
        body.pop(name, None)
    body["model"] = None
    for name in ("max_tokens", "max_completion_tokens"):
        body[name] = min(body.get(name) or MAX_TOKENS, MAX_TOKENS)
    body["min_tokens"] = min(body.get("min_tokens") or 0, MAX_TOKENS)
    body["n"] = min(body.get("n") or 1, MAX_N)
    if not body.get("stream"):
        body.pop("stream_options", None)
    if not body.get("logprobs"):
        body.pop("top_logprobs", None)
    if body.get("logprobs") is not None:
        body.pop("echo", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[:MAX_PROMPTS] if prompt and not isinstance(prompt[0], int) else [prompt]
        prompt = [p[:MAX_PROMPT_IDS] if isinstance(p, list) else p for p in prompt]
        body["prompt"] = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt


def register_hooks() -> None:
    """schemathesis's hooks, when it loads this file as its hooks module (SCHEMATHESIS_HOOKS)."""
    import schemathesis

    @schemathesis.hook
    def before_call(context, case, kwargs) -> None:
        meta = case.meta
        negative = meta is None or meta.generation.mode.is_negative or any(
            component.mode.is_negative for component in meta.components.values())
        if not negative:  # a request the document forbids is sent as it was made
            keep_servable(case.body, case.path)

    @schemathesis.hook
    def map_body(context, body):
        """An upload's file is judged as JSONL, beyond its form: a generated file (bytes, in schemathesis's wrapper)
        becomes a batch line, as it is made, so that schemathesis still knows whether the request is allowed."""
        upload = context.operation is not None and context.operation.path == "/v1/files"
        file = body.get("file") if upload and isinstance(body, dict) else None
        if isinstance(file, bytes) or hasattr(file, "data"):
            body = {**body, "file": type(file)(BATCH_LINE)}
        return body


if os.environ.get("SCHEMATHESIS_HOOKS") == Path(__file__).stem and __name__ != "__main__":
    register_hooks()


def tiny_model(folder: Path) -> str:
    """The tests' tiny llama with their word-level tokenizer and chat template (tests/conftest.py, servers.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_hf_model
    from servers import save_tiny_tokenizer

    make_hf_model("llama").save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    return str(folder)


def run_schemathesis(url: str, args: argparse.Namespace, report: Path) -> int:
    """schemathesis's CLI on the document, its events written to `report`; its exit status."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", ",".join(CHECKS),
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--continue-on-failure",
               "--suppress-health-check", "all", "--output-sanitize", "false", "--request-timeout", "60",
               "--report", "ndjson", "--report-ndjson-path", str(report), "--workers", "1"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": Path(__file__).stem,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    output = None if args.verbose else subprocess.DEVNULL
    return subprocess.run(command, env=env, stdout=output, stderr=output, timeout=args.timeout,
                          cwd=report.parent).returncode  # its own files (.schemathesis/) go to the scratch folder


def tally(report: Path) -> tuple[int, collections.Counter, collections.Counter, int]:
    """(requests, 5xx by operation, failed checks by (check, operation), requests with a failed check other than
    not_a_server_error) from the run's events."""
    requests, mismatched = 0, 0
    server_errors: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    for line in report.read_text().splitlines():
        recorder = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        interactions = recorder.get("interactions", {})
        requests += len(interactions)
        for case_id, checks in recorder.get("checks", {}).items():
            case = recorder["cases"][case_id]["value"]
            operation = f"{case['method']} {case['path']}"
            status = (interactions.get(case_id) or {}).get("response", {}).get("status_code", 0)
            server_errors[operation] += status >= 500
            failed = {c["name"] for c in checks if c["status"] != "success"}
            failures.update((check, operation) for check in failed)
            mismatched += bool(failed - {"not_a_server_error"})
    return requests, +server_errors, failures, mismatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=50, help="generated requests per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds the whole run may take")
    parser.add_argument("--verbose", action="store_true", help="schemathesis's own report too")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.max_examples = 3
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import serving

    with tempfile.TemporaryDirectory() as scratch, serving(tiny_model(Path(scratch))) as server:
        report = Path(scratch) / "events.ndjson"
        run_schemathesis(server.url, args, report)
        requests, server_errors, failures, mismatched = tally(report)
    print(f"5xx: {sum(server_errors.values())} of {requests} requests; spec mismatches: {mismatched} of {requests}")
    for operation, count in sorted(server_errors.items()):
        print(f"  5xx  {operation}: {count}")
    for (check, operation), count in sorted(failures.items()):
        print(f"  {check}  {operation}: {count}")
    sys.exit(1 if server_errors or mismatched or not requests else 0)


if __name__ == "__main__":
    main()
