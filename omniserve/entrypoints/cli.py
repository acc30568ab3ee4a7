"""The `omniserve` command: `omniserve generate "prompt"` and `omniserve chat`."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

from omniserve.config import ConfigError
from omniserve.engine.args import EngineArgs
from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.llm import LLM
from omniserve.models.loader import ModelLoadError
from omniserve.sampling.params import InvalidRequestError, SamplingParams


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="seed of the request's sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--service-class", choices=["ls", "be"], default="ls",
                       help="ls (latency-sensitive) or be (best-effort: may decode in the CPU attention pool)")


def _sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    return SamplingParams(
        n=n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, stop=args.stop, service_class=args.service_class,
    )


def _stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> str:
    """Prints the completion as it is generated; returns its text."""
    request_id = uuid.uuid4().hex
    engine.add_request(request_id, prompt, params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                delta = output.outputs[0].delta_text
                text += delta
                print(delta, end="", flush=True)
    finally:
        engine.abort_request(request_id)
    print()
    return text


def _generate(args: argparse.Namespace) -> None:
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    if args.n == 1 and not args.no_stream:
        _stream(llm.engine, args.prompt, _sampling_params(args))
        return
    for completion in llm.generate(args.prompt, _sampling_params(args, args.n), use_tqdm=False)[0].outputs:
        print(completion.text)
        if args.n > 1:
            print("-" * 40)


def _chat(args: argparse.Namespace) -> None:
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    print("omniserve chat: type a message, /reset to start over, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line:
            continue
        if line == "/reset":
            conversation = conversation[:1] if args.system else []
            continue
        conversation.append({"role": "user", "content": line})
        try:
            reply = _stream(llm.engine, llm.apply_chat_template(conversation), _sampling_params(args))
        except InvalidRequestError as exc:
            conversation.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        conversation.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt")
    generate.add_argument("prompt")
    generate.add_argument("--n", type=int, default=1, help="completions to generate")
    generate.add_argument("--no-stream", action="store_true", help="print the completion only when it is done")
    _add_sampling_args(generate)
    EngineArgs.add_cli_args(generate)
    generate.set_defaults(handler=_generate)

    chat = commands.add_parser("chat", help="chat with the model in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat)
    EngineArgs.add_cli_args(chat)
    chat.set_defaults(handler=_chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, ModelLoadError, InvalidRequestError) as exc:
        sys.exit(f"omniserve: error: {exc}")


if __name__ == "__main__":
    main()
