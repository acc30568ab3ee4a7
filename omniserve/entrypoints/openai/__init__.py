"""The OpenAI-compatible server. What other parts of omniserve use of it (the scale-out instances and router):

    build_app(engine, served_names, api_keys)   the FastAPI app in front of an engine (api_server.py)
    listen_socket(host, port)                   a bound socket to serve an app on
    run_server(app, host, port)                 serves until SIGTERM, then drains
    request_class(service_tier, priority, ...)  the class a request is served in (service_classes.py)

Imported on first use, so that the router loads without torch and the models."""

import importlib

_EXPORTS = {
    "build_app": "omniserve.entrypoints.openai.api_server",
    "listen_socket": "omniserve.entrypoints.openai.api_server",
    "run_server": "omniserve.entrypoints.openai.api_server",
    "asks_best_effort": "omniserve.entrypoints.openai.service_classes",
    "request_class": "omniserve.entrypoints.openai.service_classes",
    "service_tier": "omniserve.entrypoints.openai.service_classes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omniserve.entrypoints.openai' has no attribute {name!r}")
