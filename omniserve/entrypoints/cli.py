"""The `omniserve` command: `omniserve serve` (the OpenAI-compatible server), `omniserve router` (one endpoint in
front of several servers), `omniserve generate "prompt"`, `omniserve chat`, `omniserve profile`, `omniserve bench`
(the serving benchmark), `omniserve eval gsm8k` (the accuracy of a running OpenAI-compatible server) and
`omniserve simulate` (the cluster-scale simulator); `omniserve run-batch` runs an OpenAI batch file offline;
`omniserve build-kernel` is a set-up step."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import TYPE_CHECKING

# Only torch-free modules at the top: `omniserve simulate` (and --help) run where torch is not installed. The commands
# that build an engine import it when they run.
from omniserve.config import ConfigError
from omniserve.engine.args import EngineArgs
from omniserve.models.hf_config import ModelLoadError
from omniserve.sampling.params import InvalidRequestError, SamplingParams

if TYPE_CHECKING:
    from omniserve.engine.llm_engine import LLMEngine


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="above 1 makes the prompt's and the completion's tokens less likely")
    group.add_argument("--sampling-seed", type=int, default=None, help="seed of the request's sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--service-class", choices=["ls", "be"], default="ls",
                       help="ls (latency-sensitive) or be (best-effort: may decode in the CPU attention pool)")
    group.add_argument("--service", default=None, help="a named service from --services (sets class and SLOs)")


def _sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    return SamplingParams(
        n=n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, stop=args.stop, service_class=args.service_class,
        service=args.service,
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
    from omniserve.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    if args.n == 1 and not args.no_stream:
        _stream(llm.engine, args.prompt, _sampling_params(args))
        return
    for completion in llm.generate(args.prompt, _sampling_params(args, args.n), use_tqdm=False)[0].outputs:
        print(completion.text)
        if args.n > 1:
            print("-" * 40)


def _chat(args: argparse.Namespace) -> None:
    from omniserve.entrypoints.llm import LLM

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


def _profile(args: argparse.Namespace) -> None:
    """Profiles the model's latency models (what the SLO-aware scheduler predicts with) and prints their accuracy."""
    import os

    from omniserve.profiler.profiler import load_or_profile, profile_cache_path

    engine_args = EngineArgs.from_cli_args(args)
    loaded, device, dtype = engine_args.load_model()
    model_name = str(loaded.path or args.model)
    settings = engine_args.profile_settings(loaded.config.max_context, engine_args.pool_config())
    output = args.output or getattr(args, "profile_path", None)
    target = output or profile_cache_path(model_name, loaded.model, device, dtype, **settings)
    cached = os.path.isfile(target) and not args.force
    latency = load_or_profile(loaded.model, device, dtype, model_name=model_name, path=target, force=args.force,
                              **settings)
    print(f"{'model':<20}{'median rel. error':>20}{'p90 rel. error':>18}{'points':>8}")
    for name, accuracy in latency.accuracy.items():
        print(f"{name:<20}{accuracy['median_rel_error']:>20.3f}{accuracy['p90_rel_error']:>18.3f}"
              f"{accuracy['points']:>8}")
    print(f"(relative errors as ratios, on measurements left out of each fit; {latency.metadata.get('measurements')} "
          f"measurements in {latency.metadata.get('profiling_seconds')} s on {latency.metadata.get('device_name')})")
    print(f"{'loaded from' if cached else 'written to'} {target}")


def _serve(args: argparse.Namespace) -> None:
    """The OpenAI-compatible server (see omniserve.entrypoints.openai.api_server)."""
    from omniserve.entrypoints.openai.api_server import build_app, run_server
    from omniserve.entrypoints.openai.auth import APIKeys
    from omniserve.entrypoints.openai.served_models import default_served_name
    from omniserve.entrypoints.openai.serving import RequestLimits
    from omniserve.batch.store import BatchStore
    from omniserve.config import cache_dir
    from omniserve.engine.llm_engine import LLMEngine
    from omniserve.profiler import profiled_latency_model

    logging.getLogger("omniserve").setLevel(args.log_level.upper())
    if args.model_tag is not None:
        args.model = args.model_tag
    api_keys = APIKeys.build(args.api_key, args.api_keys_file)  # a bad keys file fails before the model loads
    limits = RequestLimits(max_body_bytes=round(args.max_request_body_mib * 2**20), max_n=args.max_n,
                           max_stop=args.max_stop_sequences, max_stop_chars=args.max_stop_length,
                           max_prompts=args.max_prompts_per_request, max_prompt_tokens=args.max_request_prompt_tokens)
    names = args.served_model_name or [default_served_name(args.model)]
    batch_limits = _batch_limits(args, limits.max_body_bytes)
    batch_store = BatchStore(args.batch_db or cache_dir() / "batches.db")  # in use elsewhere: fail before loading
    logging.getLogger(__name__).info("batches are kept in %s", batch_store.path)
    if args.instances > 1:  # engine instances as Ray actors, and a router (with the batches) in this process
        import secrets

        from omniserve.cpu_attention.remote import connect_ray
        from omniserve.scaleout.instances import drain_instances, start_instances
        from omniserve.scaleout.router import Router, build_router_app, run_router

        connect_ray(args.ray_address)
        router_key = secrets.token_urlsafe(32)  # the instances run batch lines for this router only
        urls, actors = start_instances(EngineArgs.from_cli_args(args), names, args.instances, api_keys,
                                       args.shutdown_timeout, args.host, limits, router_key)
        app = build_router_app(Router(urls, limits=limits), api_keys, batch_store, batch_limits, router_key)
        run_router(app, args.host, args.port, log_level=args.log_level, drain=lambda: drain_instances(actors),
                   drain_grace_s=args.shutdown_timeout)
        return
    engine = LLMEngine(EngineArgs.from_cli_args(args), latency_model=profiled_latency_model)
    app = build_app(engine, names, api_keys, drain_grace_s=args.shutdown_timeout, limits=limits, batch_db=batch_store,
                    batch_limits=batch_limits)
    run_server(app, args.host, args.port, log_level=args.log_level)


def _batch_limits(args: argparse.Namespace, max_line_bytes: int):
    from omniserve.batch.service import BatchLimits

    return BatchLimits(max_file_bytes=round(args.batch_max_file_mib * 2**20), max_lines=args.batch_max_lines,
                       max_line_bytes=max_line_bytes, max_queued=args.batch_max_queued)


def _run_batch(args: argparse.Namespace) -> None:
    """A batch file through the engine, offline (see omniserve.entrypoints.openai.run_batch)."""
    from omniserve.engine.llm_engine import LLMEngine
    from omniserve.entrypoints.openai.run_batch import run_batch
    from omniserve.entrypoints.openai.served_models import default_served_name
    from omniserve.profiler import profiled_latency_model

    logging.getLogger("omniserve").setLevel(logging.WARNING)
    engine = LLMEngine(EngineArgs.from_cli_args(args), latency_model=profiled_latency_model)
    names = args.served_model_name or [default_served_name(args.model)]
    counts = run_batch(engine, names, args.input_file, args.output_file,
                       _batch_limits(args, round(args.max_request_body_mib * 2**20)))
    print(f"{counts['completed']} of {counts['total']} lines answered, {counts['failed']} failed: {args.output_file}",
          file=sys.stderr)


def _build_kernel(args: argparse.Namespace) -> None:
    """Builds the CPU decode-attention kernel for this source, flags and CPU (a set-up step: `make setup` runs it)."""
    from omniserve.cpu_attention.kernel import build_kernel

    logging.getLogger("omniserve").setLevel(logging.INFO)  # say that it is building, and for how long
    target = build_kernel(**({} if args.timeout is None else {"timeout_s": args.timeout}))
    if target is None:
        sys.exit("omniserve: error: the CPU decode-attention kernel could not be built (see the warning above); "
                 "the slower torch path will be used")
    print(f"CPU decode-attention kernel: {target}")


def _route(args: argparse.Namespace) -> None:
    """A router in front of engine instances started elsewhere (see omniserve.scaleout.router)."""
    from omniserve.batch.store import BatchStore
    from omniserve.config import cache_dir
    from omniserve.entrypoints.openai.auth import APIKeys
    from omniserve.scaleout.router import Router, build_router_app, run_router

    logging.getLogger("omniserve").setLevel(args.log_level.upper())
    api_keys = APIKeys.build(args.api_key, args.api_keys_file)
    batch_store = BatchStore(args.batch_db or cache_dir() / "router-batches.db")
    app = build_router_app(Router(args.instance_urls, args.poll_interval), api_keys, batch_store)
    run_router(app, args.host, args.port, log_level=args.log_level)


def _add_engine_commands(commands) -> None:
    """The commands that build an engine in this process: generate, chat, profile."""
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

    profile = commands.add_parser("profile", help="measure the latency models the scheduler predicts with")
    profile.add_argument("--output", default=None, help="where to write the profile; default: the profile cache "
                         "($OMNISERVE_CACHE_DIR or ~/.cache/omniserve, under profiles/)")
    profile.add_argument("--force", action="store_true", help="profile again even if the profile exists")
    EngineArgs.add_cli_args(profile)
    profile.set_defaults(handler=_profile)


def _add_listen_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="serve the OpenAI API (completions, chat, models, metrics)")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as --model (`vllm serve MODEL`)")
    _add_listen_args(serve)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) in the API; services appear as NAME-SERVICE, best effort as NAME-batch "
                       "(default: --model as given, or smollm2 for the built-in model)")
    _add_key_args(serve)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds that requests in flight get to finish after SIGTERM before they are ended")
    _add_limit_args(serve)
    serve.add_argument("--instances", type=int, default=1,
                       help="engine instances (Ray actors, a GPU each when the cluster has them) behind one endpoint "
                       "that routes LS requests by SLO headroom and BE requests by spare capacity")
    _add_batch_args(serve)
    serve.add_argument("--batch-db", default=None, help="SQLite database of the Batch API's files, batches and "
                       "lines, kept across restarts (default: batches.db in $OMNISERVE_CACHE_DIR or "
                       "~/.cache/omniserve)")
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(handler=_serve)

    run_batch = commands.add_parser("run-batch", help="run an OpenAI batch file (JSONL) offline: every line's answer "
                                    "in the output file, in input order")
    run_batch.add_argument("-i", "--input-file", required=True, help="the batch file: one request per line, as for "
                           "the Batch API ({custom_id, method, url, body})")
    run_batch.add_argument("-o", "--output-file", required=True, help="where the answers go (JSONL)")
    run_batch.add_argument("--served-model-name", nargs="+", default=None, help="the model names the lines may use")
    run_batch.add_argument("--max-request-body-mib", type=float, default=25.0, help="largest line, in MiB")
    _add_batch_args(run_batch)
    EngineArgs.add_cli_args(run_batch)
    run_batch.set_defaults(handler=_run_batch)

    route = commands.add_parser("router", help="one OpenAI endpoint in front of running omniserve instances")
    route.add_argument("instance_urls", nargs="+", help="base URLs of the instances (http://host:port)")
    _add_listen_args(route)
    route.add_argument("--poll-interval", type=float, default=0.5, help="seconds between load polls of each instance")
    _add_key_args(route, " (the instances' keys: the router keeps files and batches per key; batch lines run on "
                  "instances without keys only)")
    route.add_argument("--batch-db", default=None, help="SQLite database of the router's files, batches and lines "
                       "(default: router-batches.db in $OMNISERVE_CACHE_DIR or ~/.cache/omniserve)")
    route.set_defaults(handler=_route)


def _add_key_args(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--api-key", action="append", default=None,
                        help=f"API key clients must send (Authorization: Bearer KEY); repeatable{note}")
    parser.add_argument("--api-keys-file", default=None,
                        help="TOML or YAML file mapping API keys to the classes (ls, be) each may use")


def _add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits on one request")
    group.add_argument("--max-request-body-mib", type=float, default=25.0,
                       help="largest request body, in MiB; a larger one gets 413 (default: OpenAI's limit)")
    group.add_argument("--max-n", type=int, default=128,
                       help="most completions one request may ask for (n; default: OpenAI's limit)")
    group.add_argument("--max-stop-sequences", type=int, default=16,
                       help="most stop strings one request may give (OpenAI allows 4, vLLM any number)")
    group.add_argument("--max-stop-length", type=int, default=1024,
                       help="longest stop string, in characters (a stream holds back text that may begin one)")
    group.add_argument("--max-prompts-per-request", type=int, default=2048,
                       help="most completions one request may run: its prompts times n (default: OpenAI's limit on "
                       "prompts)")
    group.add_argument("--max-request-prompt-tokens", type=int, default=1 << 20,
                       help="most prompt tokens one request may carry, all its prompts together")


def _add_batch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batches")
    group.add_argument("--batch-max-file-mib", type=float, default=200.0,
                       help="largest batch file upload, in MiB (default: OpenAI's limit)")
    group.add_argument("--batch-max-lines", type=int, default=50_000,
                       help="most lines (requests) in one batch (default: OpenAI's limit)")
    group.add_argument("--batch-max-queued", type=int, default=64,
                       help="batch lines submitted to the engine and not started yet: the engine always has batch "
                       "work to fit around live traffic, without holding whole batches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_engine_commands(commands)
    _add_serve_command(commands)

    build_kernel = commands.add_parser("build-kernel", help="build the CPU decode-attention kernel (a set-up step)")
    build_kernel.add_argument("--timeout", type=float, default=None,
                              help="seconds the build may take before giving up (the torch path is used then)")
    build_kernel.set_defaults(handler=_build_kernel)

    # Imported here: `omniserve serve` need not import the benchmark, the evaluation or the simulator.
    from omniserve.bench.cli import add_bench_command
    from omniserve.evaluation.cli import add_eval_command
    from omniserve.simulator.cli import add_simulate_command

    add_bench_command(commands)
    add_eval_command(commands)
    add_simulate_command(commands)
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
