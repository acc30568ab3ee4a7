"""Model names in the API, and which service each one stands for.

With `--served-model-name smollm2` (several names are aliases of one another):

    smollm2            the model; a request is latency-sensitive unless it asks for best effort
                       (`service_tier: "flex"`, or vLLM's `priority` > 0)
    smollm2-batch      the built-in best-effort service
    smollm2-<name>     each service named in a --services file (e.g. smollm2-chat, smollm2-batch)

The built-in latency-sensitive service (`ls`) is the model name itself; the built-in best-effort one (`be`) is
`<name>-batch`. A request that asks for best effort from a latency-sensitive service is an error, not a silent change
of class.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniserve.engine.services import Service, ServiceRegistry
from omniserve.entrypoints.openai.protocol import ModelCard, ModelList
from omniserve.entrypoints.openai.service_classes import asks_best_effort, request_class, service_tier
from omniserve.errors import APIError
from omniserve.sampling.params import ServiceClass

DEFAULT_MODEL_NAME = "smollm2"
"""The served name of the built-in default model."""
_BUILTIN_SUFFIXES = {"ls": None, "be": "batch"}


def default_served_name(model: str | None) -> str:
    """vLLM serves a model under the --model argument as given; the built-in default model is `smollm2`."""
    return DEFAULT_MODEL_NAME if model is None else model


@dataclass(frozen=True)
class ServedModel:
    name: str
    service: Service | None
    """The service this name stands for; None: the class is chosen per request."""


@dataclass(frozen=True)
class Resolved:
    """Where one request goes."""

    model: ServedModel
    service: Service
    """The service the engine will put it in."""

    @property
    def service_class(self) -> ServiceClass:
        return self.service.service_class

    @property
    def service_tier(self) -> str:
        """What the response's `service_tier` says: OpenAI's "flex" for best effort, "default" otherwise."""
        return service_tier(self.service_class)


class ServedModels:
    def __init__(self, served_names: list[str], services: ServiceRegistry, root: str, max_model_len: int) -> None:
        if not served_names:
            raise ValueError("at least one served model name is needed")
        self.services = services
        self.root = root
        self.max_model_len = max_model_len
        self.by_name: dict[str, ServedModel] = {}
        for name in served_names:
            self.by_name[name] = ServedModel(name, None)
            for service in services.services.values():
                suffix = _BUILTIN_SUFFIXES.get(service.name, service.name)
                if suffix is not None:
                    self.by_name[f"{name}-{suffix}"] = ServedModel(f"{name}-{suffix}", service)
        self.default_name = served_names[0]

    def resolve(self, name: str | None, tier: str | None = None, priority: int = 0) -> Resolved:
        """The served model and service for a request's `model` (None: the default name), `service_tier` and
        `priority` (service_classes.py's rule). Unknown: 404."""
        model = self.by_name.get(self.default_name if name is None else name)
        if model is None:
            raise APIError(404, f"The model `{name}` does not exist; this server has: {', '.join(self.by_name)}",
                           param="model", code="model_not_found")
        if model.service is None:
            return Resolved(model, self.services.resolve(None, request_class(tier, priority, None)))
        if asks_best_effort(tier, priority) and model.service.service_class is ServiceClass.LS:
            raise APIError(400, f"`{model.name}` is a latency-sensitive service, but the request asks for best effort "
                           "(service_tier 'flex' or priority > 0)", param="service_tier")
        return Resolved(model, model.service)

    def resolve_best_effort(self, name: str | None) -> Resolved:
        """Where a batch line goes: the best-effort service the name stands for, or else the model's built-in one
        (a line for a latency-sensitive service runs as best effort, not as an error)."""
        model = self.resolve(name).model
        if model.service is not None and model.service.service_class is ServiceClass.BE:
            return Resolved(model, model.service)
        return Resolved(model, self.services.resolve(None, ServiceClass.BE))

    def cards(self) -> ModelList:
        data = []
        for model in self.by_name.values():
            service = model.service
            data.append(ModelCard(
                id=model.name, root=self.root, max_model_len=self.max_model_len,
                parent=None if service is None else self._base_of(model.name),
                service=None if service is None else service.name,
                service_class=None if service is None else service.service_class.value,
                ttft_slo=None if service is None else service.ttft_slo,
                tpot_slo=None if service is None else service.tpot_slo,
            ))
        return ModelList(data=data)

    def _base_of(self, name: str) -> str | None:
        return next((base for base, m in self.by_name.items() if m.service is None and name.startswith(base + "-")),
                    None)
