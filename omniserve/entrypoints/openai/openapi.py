"""The OpenAPI document of one running server: FastAPI's, made to state what this server enforces.

pydantic's models give the fields and their types; the bounds are checked elsewhere (SamplingParams, the request
limits of `omniserve serve`'s flags, the engine's context and vocabulary), so they are declared here, with the values
of the server that serves the document: a client generated from it, or one that checks requests against it, refuses
what this server would refuse. Rules between fields (best_of equal to n, stream_options only with stream, at most one
structured-output field) and what only the engine can judge (a grammar, a regex, a tool's JSON schema, a prompt whose
tokens and max_tokens pass the context together) are in the descriptions, answered with 400.
"""

from __future__ import annotations

from typing import Any

from omniserve.batch.protocol import BATCH_ENDPOINTS
from omniserve.entrypoints.openai.serving import ServerState

_SAMPLING_BOUNDS: dict[str, dict[str, Any]] = {  # SamplingParams' checks, in JSON Schema's words
    "temperature": {"minimum": 0},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "min_p": {"minimum": 0, "maximum": 1},
    "min_tokens": {"minimum": 0},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "repetition_penalty": {"exclusiveMinimum": 0},
    "stop_token_ids": {"items": {"type": "integer", "minimum": 0}},
    "logit_bias": {"maxProperties": 0, "description": "Not supported: only an empty object (or null) is accepted"},
    "guided_choice": {"minItems": 1},
}


_BATCH_LINE = '{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello"}}\n'


def server_document(document: dict, state: ServerState) -> dict:
    """FastAPI's `document` for the app of `state`, changed in place: validation errors are 400 (declared per route
    with the other errors, so FastAPI's 422 goes), and the bounds this server enforces are declared."""
    for path in document["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        _declare(schemas[model]["properties"], {**_SAMPLING_BOUNDS, **_generation_limits(state)})
    _declare(schemas["CompletionRequest"]["properties"], _completion_limits(state))
    _declare(schemas["ChatCompletionRequest"]["properties"], {
        "max_completion_tokens": _max_tokens(state), "top_logprobs": {"minimum": 0, "maximum": 20}})
    _declare_messages(schemas)
    _declare_tokenizer_routes(schemas, state)
    _declare_batch_routes(document, schemas)
    return document


def _declare(properties: dict, keywords: dict[str, dict]) -> None:
    """Adds each field's keywords beside its type (a bound such as `minimum` constrains only the values of its
    type, so a nullable field stays nullable)."""
    for name, extra in keywords.items():
        properties[name].update(extra)


def _max_tokens(state: ServerState) -> dict:
    # A prompt has at least one token (BOS, or one id), and prompt + max_tokens must fit in the context.
    return {"minimum": 1, "maximum": state.models.max_model_len - 1}


def _token_id(state: ServerState) -> dict:
    return {"type": "integer", "minimum": 0, "maximum": state.engine.model_config.vocab_size - 1}


def _generation_limits(state: ServerState) -> dict[str, dict]:
    """The request limits (`omniserve serve`'s flags) both generation routes enforce."""
    limits = state.limits
    stop = {"type": "string", "maxLength": limits.max_stop_chars}
    return {
        "n": {"minimum": 1, "maximum": limits.max_n},
        "stop": {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": limits.max_stop}, {"type": "null"}]},
        "max_tokens": _max_tokens(state),
    }


def _completion_limits(state: ServerState) -> dict[str, dict]:
    """A completion's prompt: text (when the model has a tokenizer) or token ids, one or a batch, none empty."""
    ids = {"type": "array", "items": _token_id(state), "minItems": 1, "maxItems": state.models.max_model_len - 1}
    forms: list[dict] = [ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": state.limits.max_prompts}]
    if state.max_prompt_chars is not None:
        text = {"type": "string", "maxLength": state.max_prompt_chars}
        forms += [text, {"type": "array", "items": text, "minItems": 1, "maxItems": state.limits.max_prompts}]
    return {
        "prompt": {"anyOf": forms, "description": "n x the number of prompts may be at most "
                   f"{state.limits.max_prompts}; all the prompts together at most "
                   f"{state.limits.max_prompt_tokens} tokens"},
        "logprobs": {"minimum": 0, "maximum": 20},
        "suffix": {"maxLength": 0, "description": "Not supported: only an empty string (or null) is accepted"},
        "best_of": {"minimum": 1, "description": "Only best_of == n is supported"},
    }


def _declare_messages(schemas: dict) -> None:
    """Chat content is text: a list of parts is joined, and each part must be a text part."""
    part = schemas["ContentPart"]
    part["properties"]["type"]["enum"] = ["text"]
    part["properties"]["text"] = {"type": "string"}
    part["required"] = ["type", "text"]


def _declare_tokenizer_routes(schemas: dict, state: ServerState) -> None:
    tokenize = schemas["TokenizeRequest"]
    tokenize["properties"]["messages"]["minItems"] = 1
    tokenize["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                         for name in ("prompt", "messages")]  # one of them, not null
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = _token_id(state)


def _declare_batch_routes(document: dict, schemas: dict) -> None:
    """The routes of the Files and Batches API read their inputs themselves (an upload is streamed to disk), so
    FastAPI knows neither the upload's form nor the 400 of a query parameter out of range."""
    schemas["BatchCreateRequest"]["properties"]["endpoint"]["enum"] = list(BATCH_ENDPOINTS)
    paths = document["paths"]
    paths["/v1/files"]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSONL in UTF-8, one request object a line"},
            "purpose": {"type": "string", "enum": ["batch"]}},
        "additionalProperties": False},  # another field is refused, as in a JSON body
        "encoding": {"file": {"contentType": "application/jsonl"}}, "example": {"purpose": "batch", "file": _BATCH_LINE},
    }}}
    error = paths["/v1/files"]["post"]["responses"]["400"]
    for path in ("/v1/files", "/v1/batches"):
        paths[path]["get"]["responses"].setdefault("400", error)
