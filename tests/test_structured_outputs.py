"""Structured outputs: completions constrained to a JSON schema, a regex, a choice or a grammar, with the default
model; every row kind samples under the mask (LS and BE on the device, BE offloaded to the CPU pool); a bad
constraint is a 400 naming its field; the OpenAI client's own helpers get valid objects. Tool calls: required and
named calls valid by construction, auto calls read by the parsers, streamed calls the same as whole ones, the
conversation's calls and results through the chat template."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from omniserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from omniserve.sampling.params import InvalidRequestError, SamplingParams
from omniserve.sampling.structured import StructuredOutputs

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person named Bob who is 30, as JSON."}]


def chat_prompt(llm, messages=ASK) -> str:
    return llm.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def greedy(spec: StructuredOutputs, **settings) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 48, "structured_outputs": spec, **settings})


# ----------------------------------------------------------------------------------------------- the parameters
def test_a_constraint_is_exactly_one_thing():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs(regex="a+", choice=["a"])
    with pytest.raises(InvalidRequestError, match="choice"):
        StructuredOutputs(choice=[])
    with pytest.raises(InvalidRequestError, match="regex must be a string"):
        StructuredOutputs(regex=5)
    assert StructuredOutputs(json=PERSON) == StructuredOutputs(json=json.dumps(PERSON))  # one cache entry


def test_the_apis_fields_map_onto_one_constraint():
    def structured(**fields):
        return ChatCompletionRequest(messages=ASK, **fields).structured()

    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert structured(response_format=schema) == StructuredOutputs(json=PERSON)
    assert structured(response_format={"type": "json_object"}) == StructuredOutputs(json_object=True)
    assert structured(response_format={"type": "text"}) is None
    assert structured(guided_json=PERSON) == StructuredOutputs(json=PERSON)
    assert structured(guided_regex="[ab]+") == StructuredOutputs(regex="[ab]+")
    assert structured(guided_choice=["x", "y"]) == StructuredOutputs(choice=("x", "y"))
    assert structured(structured_outputs={"grammar": 'start: "a"'}) == StructuredOutputs(grammar='start: "a"')
    assert CompletionRequest(prompt="p", guided_choice=["x"]).structured() == StructuredOutputs(choice=("x",))
    with pytest.raises(InvalidRequestError) as two:
        structured(guided_regex="a", guided_choice=["a"])
    assert two.value.param == "guided_choice"
    with pytest.raises(InvalidRequestError) as bad:
        structured(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert bad.value.param == "response_format"


def test_json_whitespace_is_bounded(default_llm):
    tokenizer = default_llm.engine.tokenizer

    def accepts(text: str) -> bool:
        grammar = default_llm.engine.grammars.matcher(StructuredOutputs(json=PERSON))
        return all(grammar.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert accepts('{\n  "name": "Bob",\n  "age": 30\n}') and accepts('{"name":"Bob", "age" :30}')
    assert not accepts("{" + "\n" * 3) and not accepts("{" + " " * 30)  # a small model's endless whitespace


# ------------------------------------------------------------------------------------------------------ engine
def test_each_kind_of_constraint_holds(default_llm):
    prompt = chat_prompt(default_llm)
    specs = [StructuredOutputs(json=PERSON), StructuredOutputs(json_object=True),
             StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}"), StructuredOutputs(choice=["yes", "no", "maybe"]),
             StructuredOutputs(grammar='start: "Name: " NAME\nNAME: /[A-Z][a-z]+/'),
             StructuredOutputs(grammar='root ::= "A" | "B"')]  # GBNF, converted
    outputs = default_llm.generate([prompt] * len(specs), [greedy(s, max_tokens=64) for s in specs], use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    person = json.loads(texts[0])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert outputs[0].outputs[0].finish_reason == "stop"
    # any object: the model may not close it within max_tokens; if it did, it parses
    assert texts[1].startswith("{")
    assert outputs[1].outputs[0].finish_reason == "length" or isinstance(json.loads(texts[1]), dict)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[2])
    assert texts[3] in ("yes", "no", "maybe")
    assert re.fullmatch(r"Name: [A-Z][a-z]+", texts[4])
    assert texts[5] in ("A", "B")


def test_n_completions_and_logprobs_under_a_constraint(default_llm):
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=48, logprobs=2,
                            structured_outputs=StructuredOutputs(json=PERSON))
    [output] = default_llm.generate([chat_prompt(default_llm)], params, use_tqdm=False)
    assert len(output.outputs) == 3
    for completion in output.outputs:
        assert set(json.loads(completion.text)) == {"name", "age"}
        assert len(completion.logprobs) == len(completion.token_ids)


def test_offloaded_rows_are_constrained_and_give_the_device_tokens(tmp_path_factory):
    """BE requests decoding in the CPU pool sample under the same mask, in the runner, and give the tokens they
    give on the device."""
    from omniserve import LLM

    spec = StructuredOutputs(json=PERSON)
    tokens = {}
    for placement in ("device", "cpu"):
        llm = LLM(max_model_len=1024, be_decode_placement=placement)
        swaps = []
        llm.engine.add_iteration_observer(lambda record: swaps.extend(record.plan.swap_outs))
        params = greedy(spec, service_class="be")
        outputs = llm.generate([chat_prompt(llm)] * 2, params, use_tqdm=False)
        tokens[placement] = [o.outputs[0].token_ids for o in outputs]
        assert all(set(json.loads(o.outputs[0].text)) == {"name", "age"} for o in outputs)
        assert bool(swaps) == (placement == "cpu")
        llm.engine.shutdown()
    assert tokens["cpu"] == tokens["device"]


def test_a_bad_constraint_is_refused_before_anything_runs(default_llm):
    for spec, param in ((StructuredOutputs(json={"type": "objekt"}), "structured_outputs"),
                        (StructuredOutputs(regex="[a-"), "structured_outputs"),
                        (StructuredOutputs(grammar="start: undefined_rule"), "grammar")):
        with pytest.raises(InvalidRequestError) as refused:
            default_llm.engine.add_request("bad", "hi", greedy(spec))
        assert refused.value.param == param
    assert not default_llm.engine.has_unfinished_requests()


# ------------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def default_server(default_gguf):
    from servers import serving

    with serving(default_gguf, names=("smollm2",), max_model_len=2048, chat_template="chatml-tools",
                 enable_auto_tool_choice=True, tool_call_parser="hermes") as running:
        yield running


def test_the_openai_clients_parse_helper_gets_valid_objects(default_server):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    client = default_server.client()
    completion = client.chat.completions.parse(model="smollm2", messages=ASK, response_format=Person,
                                               temperature=0.0, max_tokens=48)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_streamed_and_whole_answers_match_under_a_schema(default_server):
    client = default_server.client()
    body = dict(model="smollm2", messages=ASK, temperature=0.0, max_tokens=48,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **body, stream=True) if chunk.choices)
    assert streamed == whole and set(json.loads(whole)) == {"name", "age"}
    choice = client.completions.create(model="smollm2", prompt="Is the sea wet? Answer:", max_tokens=5,
                                       temperature=0.0, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")


def test_a_bad_schema_is_a_400_naming_its_field(default_server):
    response = default_server.post("/v1/chat/completions", {
        "model": "smollm2", "messages": ASK, "guided_json": {"type": "objekt"}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "guided_json"
    response = default_server.post("/v1/completions", {
        "model": "smollm2", "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_choice"


# -------------------------------------------------------------------------------------------------- tool calls
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                       "required": ["timezone"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris and in Tokyo, and what time is it there?"}]


def streamed_calls(stream) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish reason) reassembled from a stream, as a client does it."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name, arguments = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def check_call(name: str, arguments: str) -> None:
    import jsonschema

    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_tool_call_parsers_read_calls_and_stream_them_as_whole(monkeypatch):
    import random

    from omniserve.engine.args import EngineArgs
    from omniserve.entrypoints.openai.tool_calls import PARSERS, ToolCallStream, ToolPlan, message_content

    assert set(PARSERS) == set(next(f for f in fields(EngineArgs) if f.name == "tool_call_parser").metadata["choices"])
    cases = [  # (parser, text, content of the whole answer, calls)
        ("hermes", 'Let me look. <tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>\n'
         '<tool_call>{"name": "f", "arguments": {}}</tool_call>', "Let me look.",
         [("get_time", '{"timezone": "CET"}'), ("f", "{}")]),
        ("hermes", "a <tool_call> that never closes", "a <tool_call> that never closes", []),
        ("hermes", "<tool_call>not json</tool_call> then text", "<tool_call>not json</tool_call> then text", []),
        ("hermes", "plain <tool text", "plain <tool text", []),
        ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}', None,
         [("a", '{"x": 1}'), ("b", "{}")]),
        ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}', None, [("a", "{}")]),
        ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
        ("llama3_json", "Hello there", "Hello there", []),
    ]
    for parser, text, content, calls in cases:
        plan = ToolPlan("auto", parser=parser)
        parsed = plan.parse(text, final=True)
        assert message_content(parsed) == content, text
        assert [(c.name, c.arguments) for c in parsed.calls] == calls, text
        for seed in range(5):  # any split of the text into deltas streams the same answer
            rng, stream, got_content, got_calls, at = random.Random(seed), ToolCallStream(plan), "", [], 0
            while at < len(text):
                step = rng.randint(1, 6)
                delta_content, delta_calls = stream.feed(text[at:at + step], final=False)
                got_content, got_calls, at = got_content + delta_content, got_calls + delta_calls, at + step
            delta_content, delta_calls = stream.feed("", final=True)
            got_content, got_calls = got_content + delta_content, got_calls + delta_calls
            assert got_content == (content or ""), (text, seed)
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls


def test_a_chat_template_is_a_builtin_name_a_file_or_the_template(tmp_path):
    from servers import save_tiny_tokenizer
    from transformers import AutoTokenizer

    from omniserve.config import ConfigError
    from omniserve.tokenizer import set_chat_template

    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    set_chat_template(tokenizer, "chatml-tools")
    assert "<tool_call>" in tokenizer.apply_chat_template(ASK, tools=[WEATHER], tokenize=False)
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    set_chat_template(tokenizer, str(tmp_path / "plain.jinja"))
    assert tokenizer.apply_chat_template(ASK, tokenize=False) == f"[{ASK[0]['content']}]"
    set_chat_template(tokenizer, "{{ messages | length }}")
    assert tokenizer.apply_chat_template(ASK, tokenize=False) == "1"
    with pytest.raises(ConfigError, match="neither a file nor a template.*chatml-tools"):
        set_chat_template(tokenizer, "no-such-template")
    with pytest.raises(ConfigError, match="cannot render"):
        set_chat_template(tokenizer, "{{ messages[5]['content'] }}")
    from omniserve.engine.llm_engine import LLMEngine

    with pytest.raises(ConfigError, match="needs --tool-call-parser"):  # before the model loads
        LLMEngine(enable_auto_tool_choice=True)


def test_tool_choice_is_checked_against_the_tools_and_the_server():
    from omniserve.entrypoints.openai.tool_calls import plan_tools
    from omniserve.errors import APIError

    tools = [WEATHER, TIME]
    for args, param in [((None, "required", None, None), "tool_choice"),  # no tools
                        ((tools, "auto", None, None), "tool_choice"),  # a server without auto tool choice
                        ((tools, None, None, None), "tool_choice"),  # auto by default
                        ((tools, {"type": "function", "function": {"name": "nope"}}, None, None), "tool_choice"),
                        (([WEATHER, WEATHER], "required", None, None), "tools")]:
        with pytest.raises(APIError) as refused:
            plan_tools(*args)
        assert refused.value.status == 400 and refused.value.param == param
    assert plan_tools(tools, "none", None, None).mode == "none"
    assert plan_tools(tools, None, None, "hermes").parser == "hermes"
    assert json.loads(plan_tools(tools, "required", False, None).constraint.json)["maxItems"] == 1


def test_required_and_named_tool_calls_are_valid_streamed_or_not(default_server):
    client = default_server.client()
    body = dict(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER, TIME], temperature=0.0, max_tokens=120)
    for choice, finish in [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}},
                                                         "stop")]:
        whole = client.chat.completions.create(**body, tool_choice=choice).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert calls and whole.message.content is None and whole.finish_reason == finish
        assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in whole.message.tool_calls)
        for name, arguments in calls:
            check_call(name, arguments)
        if not isinstance(choice, str):
            assert [name for name, _ in calls] == ["get_weather"]
        content, streamed, streamed_finish = streamed_calls(
            client.chat.completions.create(**body, tool_choice=choice, stream=True))
        assert (content, streamed, streamed_finish) == ("", calls, finish)
    one = client.chat.completions.create(**body, tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_auto_tool_calls_are_read_from_the_models_answer(default_server):
    client = default_server.client()
    # The small model rarely calls on its own: its answer is steered into a Hermes call, which the parser reads.
    forced = r'Checking\. <tool_call>\n\{"name": "get_time", "arguments": \{"timezone": "(CET|JST)"\}\}\n</tool_call>'
    body = dict(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER, TIME], temperature=0.0, max_tokens=60,
                extra_body={"structured_outputs": {"regex": forced}})
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking."
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(calls) == 1 and calls[0][0] == "get_time"
    check_call(*calls[0])
    assert streamed_calls(client.chat.completions.create(**body, stream=True)) == ("Checking.", calls, "tool_calls")
    plain = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], temperature=0.0,
                                           max_tokens=8, tool_choice="none").choices[0]
    assert plain.message.content and not plain.message.tool_calls and plain.finish_reason == "length"


def test_a_conversation_with_calls_and_results_goes_through_the_template(default_server):
    client = default_server.client()
    call = client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER], temperature=0.0,
                                          max_tokens=60, tool_choice="required").choices[0].message
    messages = ASK_WEATHER + [call.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 degrees"} for c in call.tool_calls]
    rendered = default_server.post("/tokenize", {"model": "smollm2", "messages": messages, "tools": [WEATHER]})
    text = default_server.post("/detokenize", {"model": "smollm2", "tokens": rendered.json()["tokens"]}).json()
    arguments = json.loads(call.tool_calls[0].function.arguments)
    assert '"name": "get_weather"' in text["prompt"] and "<tools>" in text["prompt"]
    assert f'"arguments": {json.dumps(arguments)}' in text["prompt"]  # an object to the template, not a string
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in text["prompt"]
    answer = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                            temperature=0.0, max_tokens=8)
    assert answer.choices[0].message.content


def test_tool_requests_the_server_cannot_serve_are_400s(default_server):
    def post(**fields):
        return default_server.post("/v1/chat/completions", {"model": "smollm2", "messages": ASK_WEATHER, **fields})

    for fields, param in [
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
        (dict(tools=[{"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}],
              tool_choice="required"), "tools"),
    ]:
        response = post(**fields)
        assert response.status_code == 400, (fields, response.text)
        assert response.json()["error"]["param"] == param, response.json()
    response = post(tools=[{"type": "function", "function": {"name": "has space"}}])
    assert response.status_code == 400
