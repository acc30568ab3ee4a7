"""The one rule for which class a request to the API is served in, used by the server, the Batch API and the router
in front of several servers (so that the router sends a request where the server will serve it):

- a model name that stands for a service (e.g. `smollm2-batch`) gives that service's class;
- otherwise OpenAI's `service_tier: "flex"`, or vLLM's `priority` above 0 (a lower priority), asks for best effort,
  and anything else is latency-sensitive.

Asking for best effort from a latency-sensitive service's name is an error (the server's 400), not a change of class.
"""

from __future__ import annotations

from omniserve.sampling.params import ServiceClass

BEST_EFFORT_TIER = "flex"
"""OpenAI's service tier that asks for best effort; the server answers it for best-effort requests."""
DEFAULT_TIER = "default"
"""What the server answers for latency-sensitive requests."""


def asks_best_effort(tier: object, priority: object) -> bool:
    """Whether a request's `service_tier` and `priority` ask for best effort (raw JSON values are fine: a priority
    that is not a number asks for nothing)."""
    return tier == BEST_EFFORT_TIER or (isinstance(priority, int) and priority > 0)


def request_class(tier: object, priority: object, model_class: ServiceClass | None) -> ServiceClass:
    """The class a request is served in; `model_class`: the class of the service its model name stands for (None
    for a plain model name)."""
    if asks_best_effort(tier, priority):
        return ServiceClass.BE
    return ServiceClass.LS if model_class is None else model_class


def service_tier(service_class: ServiceClass) -> str:
    """The `service_tier` an answer reports for a request served in `service_class`."""
    return BEST_EFFORT_TIER if service_class is ServiceClass.BE else DEFAULT_TIER
