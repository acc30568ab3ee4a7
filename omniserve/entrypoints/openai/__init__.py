"""The OpenAI-compatible server. What other parts of omniserve use of it (the scale-out instances and router):

    build_app(engine, served_names, api_keys)   the FastAPI app in front of an engine (api_server.py)
    listen_socket(host, port)                   a bound socket to serve an app on
    run_server(app, host, port)                 serves until SIGTERM, then drains
    request_class(service_tier, priority, ...)  the class a request is served in (service_classes.py)

Imported on first use, so that the router loads without torch and the models."""

from omniserve.lazy import lazy_exports

_EXPORTS = {
    "build_app": "omniserve.entrypoints.openai.api_server",
    "listen_socket": "omniserve.entrypoints.openai.api_server",
    "run_server": "omniserve.entrypoints.openai.api_server",
    "asks_best_effort": "omniserve.entrypoints.openai.service_classes",
    "request_class": "omniserve.entrypoints.openai.service_classes",
    "service_tier": "omniserve.entrypoints.openai.service_classes",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
