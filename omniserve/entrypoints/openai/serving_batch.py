"""Batch lines through the same handlers as POST /v1/completions and /v1/chat/completions: a line's body is parsed
by the route's request model and answered by its handler's `complete`, so a line's answer is the answer the route
gives (with the best-effort service of the model it names, see ServedModels.resolve_best_effort)."""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import ValidationError

from omniserve.batch.service import LineNotRun
from omniserve.engine.async_engine import EngineDeadError
from omniserve.entrypoints.openai.errors import validation_message
from omniserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from omniserve.entrypoints.openai.batch_routes import check_line_request
from omniserve.entrypoints.openai.serving import Call, OpenAIServing, ServerState
from omniserve.errors import APIError, error_body


class ServingLineRunner:
    def __init__(self, state: ServerState, completions: OpenAIServing, chat: OpenAIServing) -> None:
        self._state = state
        self._routes = {"/v1/completions": (CompletionRequest, completions),
                        "/v1/chat/completions": (ChatCompletionRequest, chat)}

    @property
    def accepting(self) -> bool:
        engine = self._state.async_engine
        return not self._state.draining and engine is not None and engine.alive

    def check(self, endpoint: str, body: dict) -> tuple[str, str] | None:
        """What can be known of a line before it runs (while its batch is validated): a request the route takes,
        not streamed, for a model this server serves."""
        request, refusal = check_line_request(endpoint, body)
        if refusal is not None:
            return refusal
        try:
            self._state.models.resolve_best_effort(request.model)
        except APIError as exc:
            return exc.code or "invalid_request", exc.message
        return None

    async def run(self, endpoint: str, body: dict, request_id: str, on_started: Callable[[], None],
                  owner: str | None = None) -> tuple[int, dict]:
        request_type, handler = self._routes[endpoint]
        call = Call(request_id, None, best_effort=True, drained=False, on_started=on_started, owner=owner)
        try:
            answer = await handler.complete(request_type.model_validate(body), call)
        except ValidationError as exc:
            return 400, _error(APIError(400, *validation_message(exc.errors())))
        except APIError as exc:
            if exc.status == 503:  # draining, or the engine stopped: the line runs after the restart
                raise LineNotRun() from None
            return exc.status, _error(exc)
        except EngineDeadError:
            raise LineNotRun() from None
        finally:
            for generation in call.generations:
                generation.close()
        return 200, answer.model_dump(mode="json")


def _error(exc: APIError) -> dict:
    return json.loads(error_body(exc.status, exc.message, exc.param, exc.code))
