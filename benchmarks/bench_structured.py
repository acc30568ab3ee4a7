"""Structured outputs against free text, in one run: the built-in SmolLM2-135M-Instruct, fp32 on this CPU.

1. Validity: the openai client's `chat.completions.parse` with --models pydantic models x --prompts prompts each, on
   `omniserve serve`'s own server in this process: the share of answers that parse into the model.
2. Cost per token: --batch requests decoding together, greedy, every one under a JSON schema, against the same
   requests unconstrained: seconds per decode step (the offline engine, stepped back to back, steps with every row
   decoding only).
3. A slow constraint: one request with a large schema (--schema-properties properties) arrives while a stream runs:
   the stream's largest gap between tokens against its median.
4. Tool calls: --prompts requests over 5 tools, each with tool_choice "required" (the model picks among all five)
   and named (the tool the prompt is about): the share of calls whose arguments parse and match the tool's schema.

    python benchmarks/bench_structured.py --markdown structured.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown

TOPICS = ["a cat", "Paris", "a bicycle", "the sea", "a teacher", "a mountain", "coffee", "a robot", "winter",
          "a library", "a violin", "a river", "a dragon", "a spaceship", "bread", "a forest", "a storm", "chess",
          "a lighthouse", "an apple"]


def pydantic_models():
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    class City(BaseModel):
        name: str
        country: str
        population: int

    class Book(BaseModel):
        title: str
        author: str
        year: int
        genres: list[str]

    class Product(BaseModel):
        name: str
        price: float
        in_stock: bool

    class Event(BaseModel):
        title: str
        day: int
        month: int
        attendees: list[str]

    return [Person, City, Book, Product, Event]


def validity_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import serving

    from omniserve.models.loader import default_model_path

    import openai

    models = pydantic_models()[:args.models]
    rows = []
    with serving(str(default_model_path()), names=("smollm2",), max_model_len=2048) as server:
        client = server.client()
        for penalty in [1.0] + ([args.repetition_penalty] if args.repetition_penalty != 1.0 else []):
            valid = total = cut = 0
            for model in models:
                for topic in TOPICS[:args.prompts]:
                    messages = [{"role": "user", "content": f"Make up a {model.__name__.lower()} related to {topic}."}]
                    total += 1
                    try:
                        completion = client.chat.completions.parse(
                            model="smollm2", messages=messages, response_format=model, temperature=0.7,
                            max_tokens=args.parse_max_tokens, seed=total, extra_body={"repetition_penalty": penalty})
                    except openai.LengthFinishReasonError:  # the object was not closed within max_tokens
                        cut += 1
                        continue
                    valid += completion.choices[0].message.parsed is not None
            rows += [dict(figure=f"chat.completions.parse, repetition_penalty {penalty:g}: answers that parse",
                          value=f"{valid}/{total}", ratio=f"{valid / total:.2f}", goal="1.00"),
                     dict(figure="... cut by max_tokens before the object closed", value=f"{cut}/{total}", ratio="",
                          goal=""),
                     dict(figure="... closed and did not parse", value=f"{total - valid - cut}/{total - cut}",
                          ratio="", goal="0")]
    return rows, [f"validity: {len(models)} pydantic models x {args.prompts} prompts, temperature 0.7, at most "
                  f"{args.parse_max_tokens} tokens"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search_flights", "description": "Flights between two airports",
                                      "parameters": {
        "type": "object", "properties": {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["origin", "destination", "passengers"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "create_event", "description": "Add an event to the calendar",
                                      "parameters": {
        "type": "object", "properties": {"title": {"type": "string"}, "day": {"type": "integer", "minimum": 1,
                                                                             "maximum": 31},
                                         "guests": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
        "required": ["title", "day", "guests"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money",
                                      "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string",
                                                                                "enum": ["EUR", "USD", "JPY"]},
                                         "to": {"type": "string", "enum": ["EUR", "USD", "JPY"]}},
        "required": ["amount", "from", "to"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_reminder", "description": "Remind the user of something",
                                      "parameters": {
        "type": "object", "properties": {"text": {"type": "string"},
                                         "when": {"type": "object", "properties": {
                                             "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                             "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
                                             "required": ["hour", "minute"], "additionalProperties": False}},
        "required": ["text", "when"], "additionalProperties": False}}},
]
PLACES = ["Paris", "Tokyo", "Lisbon", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Quebec", "Hanoi", "Madrid", "Dublin",
          "Sydney", "Vienna", "Prague", "Athens", "Bogota", "Manila", "Zurich", "Havana"]
TOOL_PROMPTS = {  # four requests per tool
    "get_weather": ["Is it raining in {}?", "How warm is it in {} today?", "Weather in {}, please.",
                    "Should I take a coat in {}?"],
    "search_flights": ["Find me a flight from {} to Rome for two.", "Flights from {} to New York?",
                       "I need to fly from {} to Tokyo with my family of four.", "Any cheap flight from {} to Oslo?"],
    "create_event": ["Put a dinner in {} on my calendar for the 12th.", "Schedule a meeting about {} on the 3rd.",
                     "Add a trip to {} on the 20th with Ann and Bob.", "Book a party in {} on the 31st."],
    "convert_currency": ["How much is 50 euros in dollars for my trip to {}?", "Convert 1000 yen to euros ({}).",
                         "What are 20 dollars in yen? I am going to {}.", "Change 75 EUR to USD before {}."],
    "set_reminder": ["Remind me to call the hotel in {} at 9.", "Set a reminder at 18:30 about the trip to {}.",
                     "Remind me at noon to pack for {}.", "Tell me at 7:15 to book the hotel in {}."],
}


def tool_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    import sys

    import jsonschema

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import serving

    from omniserve.models.loader import default_model_path

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    templates = [(name, template) for name, templates in TOOL_PROMPTS.items() for template in templates]
    requests = [(name, template.format(PLACES[i % len(PLACES)]))
                for i, (name, template) in enumerate(templates)][:args.prompts]
    counts = {"required": [0, 0, 0], "named": [0, 0, 0]}  # answers, calls, valid calls
    with serving(str(default_model_path()), names=("smollm2",), max_model_len=2048,
                 chat_template="chatml-tools") as server:
        client = server.client()
        for name, prompt in requests:
            for kind, choice in [("required", "required"), ("named", {"type": "function", "function": {"name": name}})]:
                message = client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=choice,
                    temperature=0.7, seed=len(prompt), max_tokens=args.parse_max_tokens).choices[0].message
                counts[kind][0] += 1
                for call in message.tool_calls or []:
                    counts[kind][1] += 1
                    try:
                        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                        counts[kind][2] += 1
                    except (ValueError, KeyError, jsonschema.ValidationError):
                        pass
    rows = []
    for kind, (answers, calls, valid) in counts.items():
        rows.append(dict(figure=f"tool_choice {kind}: calls that parse and match the tool's schema",
                         value=f"{valid}/{calls} ({answers} answers)", ratio=f"{valid / max(calls, 1):.2f}",
                         goal="1.00"))
    return rows, [f"tools: {len(requests)} requests over {len(TOOLS)} tools (chatml-tools template), temperature 0.7, "
                  f"at most {args.parse_max_tokens} tokens"]


class MaskClock:
    """Times the sampler's grammar masks (computing the batch's bitmask and applying it), step by step."""

    def __init__(self) -> None:
        from omniserve.sampling import sampler

        self.seconds = 0.0
        self._sampler, self._apply = sampler, sampler.apply_grammar_masks

        def timed(*args):
            started = time.perf_counter()
            try:
                return self._apply(*args)
            finally:
                self.seconds += time.perf_counter() - started

        sampler.apply_grammar_masks = timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def step_seconds(engine, prompts: list[str], params, masks: MaskClock) -> tuple[float, float]:
    """Median seconds of the steps in which every request decodes (after their prefills), and the median share of
    them spent on the grammar masks."""
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    times, shares = [], []
    while engine.has_unfinished_requests():
        masks.take()
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        chunks = engine.last_iteration.plan.chunks if engine.last_iteration is not None else []
        if len(chunks) == len(prompts) and all(len(c.token_ids) == 1 for c in chunks):
            times.append(elapsed)
            shares.append(masks.take() / elapsed)
    return statistics.median(times), statistics.median(shares)


def cost_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    from omniserve.engine.llm_engine import LLMEngine
    from omniserve.sampling.params import SamplingParams
    from omniserve.sampling.structured import StructuredOutputs

    engine = LLMEngine(max_model_len=2048)
    tokenizer = engine.tokenizer
    schema = pydantic_models()[2].model_json_schema()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Describe a book about {t} as JSON."}],
                                             tokenize=False, add_generation_prompt=True) for t in TOPICS[:args.batch]]
    free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputs(json=schema))
    masks, pairs, shares = MaskClock(), [], []
    for _ in range(args.repeats):  # interleaved, so that the machine's minute weighs on both alike
        (off, _), (on, share) = step_seconds(engine, prompts, free, masks), step_seconds(engine, prompts, constrained,
                                                                                         masks)
        pairs.append((off, on))
        shares.append(share)
    off = statistics.median(a for a, _ in pairs)
    on = statistics.median(b for _, b in pairs)
    share = statistics.median(shares)
    rows = [dict(figure=f"s per decode step, batch {args.batch}: free / every row constrained",
                 value=f"{off * 1e3:.1f} / {on * 1e3:.1f} ms", ratio=f"{on / off:.2f}", goal="<= 1.10"),
            dict(figure="... the masks' share of a constrained step (bitmask computed and applied)",
                 value=f"{share * on * 1e3:.2f} ms", ratio=f"{share:.3f}", goal="")]
    engine.shutdown()
    return rows, [f"cost: {args.batch} requests, a JSON schema of 4 fields, greedy, up to {args.max_tokens} tokens, "
                  f"median of the steps where all decode, {args.repeats} interleaved repeats"]


def stall_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import serving

    from omniserve.models.loader import default_model_path

    schema = {"type": "object", "properties": {f"field_{i}": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": f"^[a-z]{{{1 + i % 7}}}[0-9]+$"}, "b": {"type": "integer"}}}
        for i in range(args.schema_properties)}, "required": [f"field_{i}" for i in range(args.schema_properties)]}
    gaps: list[float] = []
    with serving(str(default_model_path()), names=("smollm2",), max_model_len=2048) as server:
        client = server.client()

        def stream() -> None:
            last = None
            for chunk in client.completions.create(model="smollm2", prompt="Once upon a time",
                                                   max_tokens=args.stream_tokens, temperature=0.0, stream=True):
                now = time.perf_counter()
                if last is not None and chunk.choices:
                    gaps.append(now - last)
                last = now

        streaming = threading.Thread(target=stream)
        streaming.start()
        while not gaps and streaming.is_alive():  # the stream is under way
            time.sleep(0.01)
        started = time.perf_counter()
        client.completions.create(model="smollm2", prompt="{", max_tokens=8, extra_body={"guided_json": schema})
        compiled = time.perf_counter() - started
        streaming.join()
    worst, median = max(gaps), statistics.median(gaps)
    rows = [dict(figure="concurrent stream: largest gap / median gap", value=f"{worst * 1e3:.0f} / {median * 1e3:.0f} "
                 "ms", ratio=f"{worst / median:.2f}", goal="<= 2")]
    return rows, [f"stall: a schema of {args.schema_properties} object properties with patterns, whose request took "
                  f"{compiled:.2f} s, sent while a {args.stream_tokens}-token stream ran"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("validity", "cost", "stall", "tools"),
                        default=["validity", "cost", "stall", "tools"])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64, help="cost: tokens per request")
    parser.add_argument("--parse-max-tokens", type=int, default=256, help="validity: most tokens per answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repetition-penalty", type=float, default=1.2,
                        help="validity: a second pass with this penalty (1: none)")
    parser.add_argument("--schema-properties", type=int, default=300)
    parser.add_argument("--stream-tokens", type=int, default=200, help="stall: the concurrent stream's length")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.prompts, args.parse_max_tokens, args.batch, args.max_tokens = 1, 2, 48, 2, 8
        args.repeats, args.schema_properties, args.stream_tokens = 1, 20, 24
    rows, info = [], [f"command: {command_line()}", f"CPU: {cpu_model()}"]
    makers = dict(validity=validity_rows, cost=cost_rows, stall=stall_rows, tools=tool_rows)
    for part in args.parts:
        part_rows, part_info = makers[part](args)
        rows += [dict(part=part, **row) for row in part_rows]
        info += part_info
        print(f"{part}: done: {part_rows}", flush=True)
    tables = [(dict(part="part", figure="figure", value="value", ratio="ratio", goal="goal"), rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "Structured outputs", info, tables)


if __name__ == "__main__":
    main()
