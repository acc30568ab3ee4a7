"""Structured outputs: completions constrained to a JSON schema, a regex, a choice or a grammar, with the default
model; every row kind samples under the mask (LS and BE on the device, BE offloaded to the CPU pool); a bad
constraint is a 400 naming its field; the OpenAI client's own helpers get valid objects."""

from __future__ import annotations

import json
import re

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

    with serving(default_gguf, names=("smollm2",), max_model_len=2048) as running:
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
