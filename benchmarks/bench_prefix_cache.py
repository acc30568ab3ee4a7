"""Prefix caching off against on, in one run: the built-in SmolLM2-135M-Instruct, fp32 on this CPU.

1. Mooncake replay. ../shared/data/mooncake/conversation_trace.jsonl marks each request's 512-token prompt blocks by
   a hash (equal hashes: equal text). Requests are sampled by whole conversation (requests linked by a block they
   share, past the first block that nearly all share), so that the sample keeps the trace's reuse, which a window of
   consecutive requests does not (the trace's repeats are spread over its hour). Each block becomes --block-tokens
   fixed random tokens (a hash always the same ones), input lengths are scaled by block_tokens / 512, outputs cut to
   --output-len, and arrivals keep the trace's order and gaps, compressed to --rate requests/s. An offline engine is
   stepped back to back; a request's TTFT runs from its arrival to the return of the step that gave its first token.
   Figures: TTFT p50, prompt tokens computed (every chunk of a request that has no output yet), greedy tokens equal.
2. Multi-turn chat: --conversations conversations of --turns turns; each turn resends the conversation (a system
   prompt, the earlier user messages and the answers the engine gave) and a new user message, once the previous
   answer is done. Figure: TTFT p50 of turns 2 and later.
3. Batch API: --lines lines sharing a --system-tokens system prompt (each with its own --suffix-tokens), one batch on
   `omniserve serve` with and without --no-enable-prefix-caching (a process each). Figure: lines/s.
4. Bookkeeping: the scheduler alone (no model; every chunk's token made up) with --running decoding requests: ms per
   iteration (plan + booking) with the cache against without.
5. The host tier: --tier-conversations conversations with system prompts of their own take turns, one request at a
   time, on device KV that holds a quarter of the prompts: the device's cache alone (it has evicted a prompt before
   its next turn) against the same with a --tier-gib host tier (--kv-offloading-size). Figure: TTFT p50 after the
   first round.
6. Offloaded requests over a shared prefix: --offload-requests BE requests decode in the CPU pool (every BE decode
   offloaded), all with one --system-tokens prompt and --suffix-tokens of their own, after one request computed
   it; a --tier-gib host tier either way. Copied: each offloaded request carries its own copy of the whole KV (as
   before the host tier was shared with the pool); in place: its host KV reads the prefix's pages in the host tier.
   Figures: the pool's host KV counted on at its peak (what placement and the scheduler's host room count),
   and output tokens/s.

    python benchmarks/bench_prefix_cache.py --markdown prefix.md
    python benchmarks/bench_prefix_cache.py --parts bookkeeping multi_turn
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown

MOONCAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"
TRACE_BLOCK = 512
PARTS = ("mooncake", "multi_turn", "batch", "bookkeeping", "host_tier", "offloaded_prefix")


@dataclass
class Arrival:
    at: float
    """Seconds after the run starts."""
    request_id: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Run:
    ttft: dict[str, float]
    tokens: dict[str, list[int]]
    prompt_tokens_computed: int
    cached_tokens: int
    seconds: float


def compared(figure: str, off: float, on: float, form: str = "{:.2f}", goal: str = "") -> dict:
    """A table row: a figure with caching off and on, and on / off."""
    return dict(figure=figure, off=form.format(off), on=form.format(on), ratio=f"{on / off:.2f}", goal=goal)


def same_tokens(off: Run, on: Run, figure: str = "greedy tokens equal") -> dict:
    same = sum(off.tokens[r] == on.tokens.get(r) for r in off.tokens)
    return dict(figure=figure, off="", on=f"{same}/{len(off.tokens)}", ratio="", goal="all")


def engine(caching: bool, **settings):
    from omniserve.engine.llm_engine import LLMEngine

    return LLMEngine(enable_prefix_caching=caching, **settings)


def drive(llm_engine, arrivals: list[Arrival], next_turn=None) -> Run:
    """Adds each request at its time and steps the engine while anything is unfinished. next_turn(request_id,
    tokens, now) may return a later Arrival (a conversation's next turn)."""
    from omniserve.sampling.params import SamplingParams

    pending = sorted(arrivals, key=lambda a: a.at)
    due: dict[str, float] = {}
    ttft, tokens, computed = {}, {}, [0]

    def count(record) -> None:
        computed[0] += sum(len(c.token_ids) for c in record.plan.chunks if c.num_generated == 0)

    llm_engine.add_iteration_observer(count)
    cached = 0
    start = time.perf_counter()
    while pending or llm_engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0].at <= now:
            arrival = pending.pop(0)
            due[arrival.request_id] = arrival.at
            llm_engine.add_request(arrival.request_id, arrival.prompt, SamplingParams(
                temperature=0.0, max_tokens=arrival.max_tokens, ignore_eos=True))
        if not llm_engine.has_unfinished_requests():
            time.sleep(min(0.05, max(0.0, pending[0].at - now)))
            continue
        for output in llm_engine.step():
            now = time.perf_counter() - start
            if output.request_id not in ttft and output.outputs[0].token_ids:
                ttft[output.request_id] = now - due[output.request_id]
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
                cached += output.num_cached_tokens or 0
                follow = next_turn(output.request_id, output.outputs[0].token_ids, now) if next_turn else None
                if follow is not None:
                    pending.append(follow)
                    pending.sort(key=lambda a: a.at)
    llm_engine.remove_iteration_observer(count)
    return Run(ttft, tokens, computed[0], cached, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ 1. Mooncake
def mooncake_sample(path: Path, requests: int, seed: int) -> tuple[list[dict], float]:
    """Whole conversations of the trace, drawn at random until `requests` requests, in trace order; and the share of
    their blocks that repeat an earlier one."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[int, int] = {}
    for index, row in enumerate(rows):
        for block in row["hash_ids"][1:]:
            if block in first_seen:
                parent[root(index)] = root(first_seen[block])
            else:
                first_seen[block] = index
    conversations: dict[int, list[int]] = {}
    for index in range(len(rows)):
        conversations.setdefault(root(index), []).append(index)
    order = list(conversations.values())
    random.Random(seed).shuffle(order)
    picked: list[int] = []
    for conversation in order:
        if len(picked) >= requests:
            break
        picked += conversation
    sample = [rows[i] for i in sorted(picked)]
    seen, repeats, blocks = set(), 0, 0
    for row in sample:
        for block in row["hash_ids"]:
            repeats += block in seen
            blocks += 1
            seen.add(block)
    return sample, repeats / blocks


def mooncake_arrivals(sample: list[dict], args: argparse.Namespace, vocab: int) -> list[Arrival]:
    scale = args.block_tokens / TRACE_BLOCK
    block_tokens: dict[int, list[int]] = {}

    def tokens_of(block: int) -> list[int]:
        if block not in block_tokens:
            rng = random.Random(block * 1_000_003 + args.seed)
            block_tokens[block] = [rng.randrange(100, vocab - 100) for _ in range(args.block_tokens)]
        return block_tokens[block]

    first, last = sample[0]["timestamp"], sample[-1]["timestamp"]
    squeeze = (len(sample) / args.rate) / max(1.0, (last - first) / 1000)
    arrivals = []
    for index, row in enumerate(sample):
        length = max(1, min(args.max_input_len, round(row["input_length"] * scale)))
        prompt = [t for block in row["hash_ids"] for t in tokens_of(block)][:length]
        arrivals.append(Arrival((row["timestamp"] - first) / 1000 * squeeze, f"m{index}", prompt,
                                min(args.output_len, max(1, row["output_length"]))))
    return arrivals


def least_computed(sample: list[dict], arrivals: list[Arrival], block_tokens: int) -> int:
    """Prompt tokens that must be computed, with every earlier request's blocks cached (a block whose hash came
    before is free, and so is every block before it; the last token is always computed)."""
    seen: set[int] = set()
    total = 0
    for row, arrival in zip(sample, arrivals):
        length = len(arrival.prompt)
        cached_blocks = 0
        for block in row["hash_ids"]:
            if block not in seen:
                break
            cached_blocks += 1
        total += length - min(cached_blocks * block_tokens, length - 1)
        seen.update(row["hash_ids"][: length // block_tokens])  # full blocks only: a page is cached once full
    return total


def mooncake_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    sample, reuse = mooncake_sample(MOONCAKE, args.requests, args.seed)
    runs = {}
    for caching in (False, True):
        llm_engine = engine(caching, max_model_len=args.max_input_len + args.output_len)
        arrivals = mooncake_arrivals(sample, args, llm_engine.model_config.vocab_size)
        runs[caching] = drive(llm_engine, arrivals)
        llm_engine.shutdown()
    off, on = runs[False], runs[True]
    prompt_tokens = sum(len(a.prompt) for a in arrivals)
    least = least_computed(sample, arrivals, args.block_tokens)
    rows = [compared("TTFT p50 (s)", statistics.median(off.ttft.values()), statistics.median(on.ttft.values()),
                     goal="<= 0.5"),
            compared("prompt tokens computed", off.prompt_tokens_computed, on.prompt_tokens_computed, "{}",
                     "<= 0.7"),
            {**compared("... the least any cache computes", off.prompt_tokens_computed, least, "{}"), "off": ""},
            compared("run seconds", off.seconds, on.seconds, "{:.0f}"),
            same_tokens(off, on)]
    info = [f"Mooncake: {len(sample)} requests in whole conversations (seed {args.seed}), {reuse:.0%} of their "
            f"blocks repeat an earlier one (37% over the whole trace); blocks of {args.block_tokens} tokens, "
            f"{prompt_tokens} prompt tokens, outputs cut to {args.output_len}, {args.rate} requests/s; "
            f"cached tokens reported: {on.cached_tokens}"]
    return rows, info


# ---------------------------------------------------------------------------------------------- 2. multi-turn
def multi_turn_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    runs = {}
    for caching in (False, True):
        llm_engine = engine(caching, max_model_len=4096)
        vocab = llm_engine.model_config.vocab_size
        rng = random.Random(args.seed)
        system = [rng.randrange(100, vocab - 100) for _ in range(args.system_tokens)]
        users = {(c, t): [rng.randrange(100, vocab - 100) for _ in range(args.user_tokens)]
                 for c in range(args.conversations) for t in range(args.turns)}
        history = {c: list(system) for c in range(args.conversations)}

        def turn(conversation: int, index: int, at: float) -> Arrival:
            history[conversation] += users[conversation, index]
            return Arrival(at, f"c{conversation}t{index}", list(history[conversation]), args.answer_tokens)

        def next_turn(request_id: str, answer: list[int], now: float) -> Arrival | None:
            conversation, index = (int(x) for x in request_id[1:].split("t"))
            history[conversation] += answer
            return turn(conversation, index + 1, now) if index + 1 < args.turns else None

        arrivals = [turn(c, 0, c * args.stagger) for c in range(args.conversations)]
        runs[caching] = drive(llm_engine, arrivals, next_turn)
        llm_engine.shutdown()
    later = {caching: statistics.median(t for r, t in run.ttft.items() if not r.endswith("t0"))
             for caching, run in runs.items()}
    first = {caching: statistics.median(t for r, t in run.ttft.items() if r.endswith("t0"))
             for caching, run in runs.items()}
    rows = [compared("TTFT p50, turns 2+ (s)", later[False], later[True], "{:.3f}", "<= 0.3"),
            compared("TTFT p50, turn 1 (s)", first[False], first[True], "{:.3f}"),
            same_tokens(runs[False], runs[True])]
    info = [f"multi-turn: {args.conversations} conversations x {args.turns} turns, system prompt "
            f"{args.system_tokens} tokens, user messages {args.user_tokens}, answers {args.answer_tokens}, starts "
            f"{args.stagger} s apart"]
    return rows, info


# ------------------------------------------------------------------------------------------------- 3. batch
def batch_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    import openai

    from omniserve.bench.compare import Server
    from omniserve.bench.metrics import Slo

    rng = random.Random(args.seed)
    system = [rng.randrange(100, 40000) for _ in range(args.system_tokens)]
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": system + [rng.randrange(100, 40000) for _ in range(args.suffix_tokens)],
                       "max_tokens": args.batch_output_len, "temperature": 0, "ignore_eos": True}}
             for i in range(args.lines)]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for caching in (False, True):
            flags = [] if caching else ["--no-enable-prefix-caching"]
            log = Path(folder) / f"server-{caching}.log"
            server = Server("omniserve", Slo(None, None), flags + ["--batch-db", str(Path(folder) / f"b{caching}.db")],
                            log, start_timeout=600)
            try:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=2, timeout=120)
                model = client.models.list().data[0].id
                content = "".join(json.dumps({**line, "body": {**line["body"], "model": model}}) + "\n"
                                  for line in lines).encode()
                upload = client.files.create(file=("lines.jsonl", content), purpose="batch")
                started = time.perf_counter()
                batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                              completion_window="24h")
                while batch.status not in ("completed", "failed", "cancelled", "expired"):
                    time.sleep(0.25)
                    batch = client.batches.retrieve(batch.id)
                seconds = time.perf_counter() - started
                output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
                answers = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]
                           for line in output.splitlines()}
                results[caching] = (seconds, answers)
            finally:
                server.stop()
    (off_s, off), (on_s, on) = results[False], results[True]
    cached = sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in on.values())
    texts = {caching: Run({}, {k: a["choices"][0]["text"] for k, a in answers.items()}, 0, 0, seconds)
             for caching, (seconds, answers) in results.items()}
    rows = [compared("lines/s", len(off) / off_s, len(on) / on_s, goal=">= 2"),
            same_tokens(texts[False], texts[True], "texts equal")]
    info = [f"batch: {args.lines} lines, a {args.system_tokens}-token system prompt + {args.suffix_tokens} tokens "
            f"each, {args.batch_output_len} output tokens; cached tokens reported with caching: {cached}"]
    return rows, info


# -------------------------------------------------------------------------------------------- 4. bookkeeping
def bookkeeping_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    from omniserve.engine.scheduler import Scheduler, SchedulerConfig
    from omniserve.engine.scheduler.plan import RunnerOutput
    from omniserve.engine.scheduler.request import Request
    from omniserve.kv_cache import PageAllocator, PageTable, PrefixCache
    from omniserve.sampling.params import SamplingParams
    from omniserve.simulator.sim import one_layer_outputs

    page, prompt_len, steps = 16, 512, 400
    iterations = {}
    for caching in (False, True):
        pages = args.running * (prompt_len + steps * 2) // page + 64
        table = PageTable(PageAllocator(pages, PrefixCache() if caching else None), page)
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=args.running, max_num_batched_tokens=1 << 20), table,
                              eos_token_ids=(2,))
        shared = list(range(1000, 1000 + prompt_len // 2))
        for i in range(args.running):
            prompt = shared + [2000 + i] * (prompt_len // 2)
            scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=steps * 2, ignore_eos=True),
                                          steps * 2))

        def iteration(scheduler=scheduler) -> None:
            plan = scheduler.schedule()
            sampled, _ = one_layer_outputs(plan, 1, 7)
            scheduler.update(plan, RunnerOutput(sampled, [], []))

        while any(not r.is_decoding for r in scheduler.running) or scheduler.waiting:
            iteration()
        iterations[caching] = iteration
    times = {False: [], True: []}
    for _ in range(steps):  # interleaved, so that the machine's drift hits both alike
        for caching, iteration in iterations.items():
            started = time.perf_counter()
            iteration()
            times[caching].append(time.perf_counter() - started)
    per_iteration = {caching: statistics.median(t) * 1e3 for caching, t in times.items()}
    rows = [dict(figure=f"ms per iteration, {args.running} decoding", off=f"{per_iteration[False]:.3f}",
                 on=f"{per_iteration[True]:.3f}", ratio=f"{per_iteration[True] - per_iteration[False]:+.3f} ms",
                 goal="<= +0.2 ms")]
    return rows, [f"bookkeeping: {args.running} requests of {prompt_len} tokens decoding, pages of {page}, "
                  f"median of {steps} iterations"]


# ------------------------------------------------------------------------------------------- 5. the host tier
def host_tier_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """--tier-conversations conversations, each with a system prompt of its own, take turns one request at a time
    (round robin), on device KV that holds a quarter of their system prompts: the device's cache alone has evicted
    a prompt before its next turn; the host tier has kept it."""
    prompt_len = args.tier_system_tokens + args.user_tokens
    working_set = args.tier_conversations * args.tier_system_tokens
    pages = max(working_set // 4, prompt_len + args.answer_tokens + 16) // 16
    runs = {}
    for tier in (None, args.tier_gib):
        llm_engine = engine(True, max_model_len=4096, num_gpu_blocks_override=pages, kv_offloading_size=tier)
        vocab = llm_engine.model_config.vocab_size
        rng = random.Random(args.seed)
        systems = [[rng.randrange(100, vocab - 100) for _ in range(args.tier_system_tokens)]
                   for _ in range(args.tier_conversations)]
        turns = args.tier_conversations * args.tier_rounds

        def request(index: int, at: float) -> Arrival:
            user = [rng.randrange(100, vocab - 100) for _ in range(args.user_tokens)]
            return Arrival(at, f"r{index}", systems[index % args.tier_conversations] + user, args.answer_tokens)

        def next_turn(request_id: str, answer: list[int], now: float) -> Arrival | None:
            index = int(request_id[1:]) + 1
            return request(index, now) if index < turns else None

        runs[tier] = drive(llm_engine, [request(0, 0.0)], next_turn)
        llm_engine.shutdown()
    first_round = {f"r{i}" for i in range(args.tier_conversations)}
    device, host = runs[None], runs[args.tier_gib]
    later = [statistics.median(t for r, t in run.ttft.items() if r not in first_round) for run in (device, host)]
    rows = [compared("TTFT p50, rounds 2+ (s)", *later, "{:.3f}", "<= 0.6"),
            compared("prompt tokens computed", device.prompt_tokens_computed, host.prompt_tokens_computed, "{}"),
            same_tokens(device, host)]
    info = [f"host tier: {args.tier_conversations} conversations with system prompts of {args.tier_system_tokens} "
            f"tokens ({working_set} in all), {args.tier_rounds} rounds of one request at a time, user messages "
            f"{args.user_tokens}, answers {args.answer_tokens}; device KV {pages} pages of 16 (a quarter of the "
            f"prompts); 'caching off' is the device's cache alone, 'caching on' adds a {args.tier_gib} GiB host tier"]
    return rows, info


# --------------------------------------------------------------------------- 6. offloaded over a shared prefix
def offloaded_prefix_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The same BE requests offloaded with their own copy of the shared prefix, then reading it in the host tier."""
    from omniserve.sampling.params import SamplingParams

    runs, peaks, held = {}, {}, {}
    for in_place in (False, True):
        llm_engine = engine(True, max_model_len=4096, kv_offloading_size=args.tier_gib, be_decode_placement="cpu")
        llm_engine.page_table.offload_reads_host_tier = in_place
        vocab = llm_engine.model_config.vocab_size
        rng = random.Random(args.seed)
        system = [rng.randrange(100, vocab - 100) for _ in range(args.system_tokens)]
        prompts = [system + [rng.randrange(100, vocab - 100) for _ in range(args.suffix_tokens)]
                   for _ in range(args.offload_requests + 1)]
        be = SamplingParams(temperature=0.0, max_tokens=args.offload_output_len, ignore_eos=True, service_class="be")
        swaps = []
        llm_engine.add_iteration_observer(lambda record: swaps.extend(record.plan.swap_outs))
        llm_engine.add_request("first", prompts[0], be)  # computes the prefix: the others' cache hit
        while llm_engine.has_unfinished_requests():
            llm_engine.step()
        pool, peak, tokens = llm_engine.cpu_pool, 0, {}
        for index, prompt in enumerate(prompts[1:]):
            llm_engine.add_request(f"r{index}", prompt, be)
        start = time.perf_counter()
        while llm_engine.has_unfinished_requests():
            for output in llm_engine.step():
                if output.finished:
                    tokens[output.request_id] = output.outputs[0].token_ids
            peak = max(peak, pool.host_capacity_bytes() - pool.free_host_bytes())
        seconds = time.perf_counter() - start
        runs[in_place] = Run({}, tokens, 0, 0, seconds)
        peaks[in_place] = peak
        held[in_place] = sum(bool(t.host_prefix_pages) for t in swaps)
        llm_engine.check_integrity()
        llm_engine.shutdown()
    output_tokens = args.offload_requests * args.offload_output_len
    copied, in_place = runs[False], runs[True]
    rows = [compared("host KV counted on, peak (MiB)", peaks[False] / 2**20, peaks[True] / 2**20, "{:.1f}"),
            compared("output tokens/s", output_tokens / copied.seconds, output_tokens / in_place.seconds, "{:.1f}"),
            dict(figure="offloaded requests reading the tier", off=str(held[False]), on=str(held[True]), ratio="",
                 goal=""),
            same_tokens(copied, in_place)]
    info = [f"offloaded prefix: {args.offload_requests} BE requests decoding in the CPU pool, one {args.system_tokens}"
            f"-token system prompt and {args.suffix_tokens} tokens of their own, {args.offload_output_len} output "
            f"tokens each, a {args.tier_gib} GiB host tier; 'caching off' is each offloaded request with its own "
            "copy of the prefix, 'caching on' reads it in the host tier"]
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=120, help="Mooncake: requests sampled")
    parser.add_argument("--block-tokens", type=int, default=16, help="Mooncake: tokens per trace block")
    parser.add_argument("--max-input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=8, help="Mooncake: most output tokens")
    parser.add_argument("--rate", type=float, default=1.0, help="Mooncake: requests/s")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--stagger", type=float, default=1.0, help="multi-turn: seconds between conversation starts")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--batch-output-len", type=int, default=8)
    parser.add_argument("--running", type=int, default=400, help="bookkeeping: decoding requests")
    parser.add_argument("--tier-conversations", type=int, default=16)
    parser.add_argument("--tier-system-tokens", type=int, default=512)
    parser.add_argument("--tier-rounds", type=int, default=3)
    parser.add_argument("--tier-gib", type=float, default=1.0, help="host tier: its size")
    parser.add_argument("--offload-requests", type=int, default=16)
    parser.add_argument("--offload-output-len", type=int, default=32)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.parts, args.running, args.requests = ["bookkeeping", "mooncake"], 16, 3
    rows, info = [], [f"command: {command_line()}", f"CPU: {cpu_model()}"]
    makers = dict(mooncake=mooncake_rows, multi_turn=multi_turn_rows, batch=batch_rows,
                  bookkeeping=bookkeeping_rows, host_tier=host_tier_rows, offloaded_prefix=offloaded_prefix_rows)
    for part in args.parts:
        part_rows, part_info = makers[part](args)
        rows += [dict(part=part, **row) for row in part_rows]
        info += part_info
        print(f"{part}: done", flush=True)
    tables = [(dict(part="part", figure="figure", off="caching off", on="caching on", ratio="on / off", goal="goal"),
               rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "Prefix caching, off against on", info, tables)


if __name__ == "__main__":
    main()
