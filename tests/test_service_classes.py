"""One rule for a request's service class: the server and the router in front of several servers classify every
request alike (the router reads the classes the servers report at /load), without loading torch."""

from __future__ import annotations

import pytest

from omniserve.engine.services import Service, ServiceRegistry
from omniserve.entrypoints.openai.served_models import ServedModels
from omniserve.errors import APIError
from omniserve.sampling.params import ServiceClass
from omniserve.scaleout.router import classify

SERVICES = ServiceRegistry([Service("chat", ServiceClass.LS, 1.0, 0.1), Service("batch", ServiceClass.BE)])
MODELS = ServedModels(["tiny"], SERVICES, "tiny", 64)
REPORTED = {name: None if m.service is None else m.service.service_class.value for name, m in MODELS.by_name.items()}


@pytest.mark.parametrize("model", ["tiny", "tiny-chat", "tiny-batch"])
@pytest.mark.parametrize("tier", [None, "default", "flex", "auto"])
@pytest.mark.parametrize("priority", [0, 1, -1])
def test_router_classifies_as_the_server_serves(model, tier, priority):
    payload = {"model": model, "service_tier": tier, "priority": priority}
    routed = classify(payload, REPORTED)
    try:
        served = MODELS.resolve(model, tier, priority).service_class
    except APIError as error:  # best effort asked of an LS service: the server refuses it, wherever it is sent
        assert (error.status, model, routed) == (400, "tiny-chat", ServiceClass.BE)
        return
    assert routed is served
    assert served is (ServiceClass.BE if tier == "flex" or priority > 0 or model == "tiny-batch" else ServiceClass.LS)


def test_raw_json_that_asks_for_nothing_is_latency_sensitive():
    for payload in ({}, {"priority": "high"}, {"priority": 1.5}, {"service_tier": ["flex"]}, {"model": ["tiny"]}):
        assert classify(payload, REPORTED) is ServiceClass.LS


def test_a_batch_line_runs_as_best_effort_whatever_its_model():
    for model in ("tiny", "tiny-chat", "tiny-batch"):
        assert MODELS.resolve_best_effort(model).service_class is ServiceClass.BE
