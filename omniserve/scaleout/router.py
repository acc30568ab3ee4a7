"""One OpenAI endpoint in front of several engine instances (each an `omniserve serve`, on its own GPU or server).

Each instance reports its own load at `/load` (LLMEngine.load_report), which the router polls every
`poll_interval_s`. A latency-sensitive request goes to the instance with the most SLO headroom, a best-effort one to
the instance with the most spare KV capacity (device and host); between two reports, the requests the router has
sent an instance count against it, so that a burst does not all land on the instance that looked best. The request's
class is read by the rule the instances serve it by (omniserve.entrypoints.openai.request_class): `service_tier:
"flex"`, vLLM's `priority` > 0, or a model name that stands for a best-effort service.

`/metrics` is the router's own counters followed by the live instances' metrics summed (shares averaged).

The router takes API keys and limits the body size as a server does (omniserve.entrypoints.openai.http_context),
and keeps Files and Batches itself, in its own durable store: their routes are a server's, and the lines run on the
instances (omniserve.scaleout.batch_lines).

An instance that fails a poll, or refuses a connection, is taken out until a poll succeeds again; a request whose
connection was refused is sent to the next instance. Bodies and responses (streams too) pass through unchanged. An
instance lost while it answers is taken out too, and its client is told: a 502 if nothing of the answer was sent
yet, else, in a stream, OpenAI's error event (code `instance_lost`) and `data: [DONE]`, as a server ends a stream it
cannot finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from omniserve.batch.service import BatchLimits, BatchService
from omniserve.batch.store import BatchStore
from omniserve.entrypoints.openai.auth import APIKeys
from omniserve.entrypoints.openai.batch_routes import BatchCollector, add_batch_routes
from omniserve.entrypoints.openai.http_context import (
    MULTIPART_SLACK_BYTES, RequestContextMiddleware, RequestLimits, add_error_handlers,
)
from omniserve.entrypoints.openai.service_classes import request_class
from omniserve.errors import error_body, error_response
from omniserve.sampling.params import ServiceClass
from omniserve.scaleout.batch_lines import RemoteLineRunner

logger = logging.getLogger(__name__)

_FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
_FORWARDED_RESPONSE_HEADERS = ("content-type", "retry-after")  # the request's id is the router's (its middleware)
# The instances' routes the router passes on (Files and Batches are its own); any other path is its own 404 or 405.
_FORWARDED_ROUTES = (("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
                     ("/v1/models/{name:path}", "GET"), ("/tokenize", "POST"), ("/detokenize", "POST"),
                     ("/version", "GET"), ("/openapi.json", "GET"), ("/docs", "GET"), ("/redoc", "GET"))
_LS_SLOT_COST = 1.0  # an LS request sent since the last report costs one sequence slot of headroom
# Instance gauges that are shares or ratios: the router's /metrics gives their mean over the instances, not the sum.
_MEAN_GAUGES = frozenset({"vllm:kv_cache_usage_perc", "omniserve:slo_attainment", "omniserve:latency_model_correction",
                          "omniserve:cpu_pool_utilization"})
_METRICS_TIMEOUT_S = 2.0


@dataclass
class Instance:
    url: str
    alive: bool = False
    report: dict = field(default_factory=dict)
    sent_ls: int = 0  # requests sent since the last report
    sent_be_tokens: int = 0

    def ls_score(self) -> float:
        slots = max(1, self.report.get("max_num_seqs", 256))
        return self.report.get("ls_headroom", 0.0) - _LS_SLOT_COST * self.sent_ls / slots

    def be_score(self) -> float:
        return self.report.get("be_spare_tokens", 0) - self.sent_be_tokens


def classify(payload: dict, model_classes: dict[str, str | None]) -> ServiceClass:
    """The request's class, by the rule the instances serve it by; `model_classes`: each served name's class, as the
    instances report it ("ls", "be", or None for a plain model name)."""
    model = payload.get("model")
    reported = model_classes.get(model) if isinstance(model, str) else None  # a bad one: the instance answers 400
    model_class = next((c for c in ServiceClass if c.value == reported), None)
    return request_class(payload.get("service_tier"), payload.get("priority"), model_class)


def request_tokens(payload: dict) -> int:
    """A rough size of the request in KV tokens (prompt characters / 4 + max_tokens), to charge a BE pick with."""
    prompt = payload.get("prompt", payload.get("messages", ""))
    return len(json.dumps(prompt)) // 4 + int(payload.get("max_tokens") or payload.get("max_completion_tokens") or 256)


class Router:
    def __init__(self, urls: list[str], poll_interval_s: float = 0.5, timeout_s: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None, limits: RequestLimits | None = None) -> None:
        if not urls:
            raise ValueError("the router needs at least one engine instance")
        self.instances = [Instance(url.rstrip("/")) for url in urls]
        self.poll_interval_s = poll_interval_s
        self.draining = False
        """Set on SIGTERM: new requests get 503 while the instances drain (see run_router)."""
        self.drain_grace_s = 30.0
        self.limits = limits or RequestLimits()
        """The instances' limits: the router refuses a body over their size limit before it reads it."""
        self.on_instance_in: Callable[[], None] | None = None
        """Called when an instance comes in (again): batch lines that waited for one may start."""
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport)
        self.registry = CollectorRegistry()
        self.routed = Counter("omniserve:router_requests", "Requests sent to each instance",
                              ["instance", "service_class"], registry=self.registry)
        self.live = Gauge("omniserve:router_instance_up", "1 while the instance answers its load polls",
                          ["instance"], registry=self.registry)

    # ------------------------------------------------------------------------------------------------ load
    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(instance) for instance in self.instances))

    async def _poll(self, instance: Instance) -> None:
        try:
            response = await self.client.get(f"{instance.url}/load", timeout=2.0)
            response.raise_for_status()
            report = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.take_out(instance, f"load poll failed: {exc!r}")
            return
        was_alive = instance.alive
        instance.alive = not report.get("draining", False)
        if instance.alive and not was_alive:
            logger.info("engine instance %s is in", instance.url)
            if self.on_instance_in is not None:
                self.on_instance_in()
        instance.report, instance.sent_ls, instance.sent_be_tokens = report, 0, 0
        self.live.labels(instance.url).set(int(instance.alive))

    def take_out(self, instance: Instance, why: str) -> None:
        if instance.alive:
            logger.warning("engine instance %s is out: %s", instance.url, why)
        instance.alive = False
        self.live.labels(instance.url).set(0)

    async def poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    # ------------------------------------------------------------------------------------------------ routing
    def model_classes(self) -> dict[str, str | None]:
        classes: dict[str, str | None] = {}
        for instance in self.instances:
            classes.update(instance.report.get("models", {}))
        return classes

    def pick(self, service_class: ServiceClass, exclude: set[str] = frozenset()) -> Instance | None:
        candidates = [i for i in self.instances if i.alive and i.url not in exclude]
        if not candidates:
            return None
        score = Instance.ls_score if service_class is ServiceClass.LS else Instance.be_score
        return max(candidates, key=score)

    def charge(self, instance: Instance, service_class: ServiceClass, payload: dict) -> None:
        """Counts a request sent to the instance against it until its next load report."""
        if service_class is ServiceClass.LS:
            instance.sent_ls += 1
        else:
            instance.sent_be_tokens += request_tokens(payload)
        self.routed.labels(instance.url, service_class.value).inc()

    async def forward(self, request: Request, path: str) -> Response:
        if self.draining:
            return error_response(503, "the server is shutting down", code="draining",
                                  headers={"Retry-After": str(max(1, round(self.drain_grace_s)))})
        body = await request.body()
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}  # the instance answers with the proper 400
        payload = payload if isinstance(payload, dict) else {}
        service_class = classify(payload, self.model_classes())
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
        headers["x-request-id"] = request.state.request_id  # one id in the router's log and the instance's
        tried: set[str] = set()
        while (instance := self.pick(service_class, tried)) is not None:
            tried.add(instance.url)
            upstream_request = self.client.build_request(request.method, instance.url + path, content=body,
                                                         headers=headers, params=request.query_params)
            try:
                upstream = await self.client.send(upstream_request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # it never had the request: the next one may
                self.take_out(instance, f"connection failed: {exc!r}")
                continue
            except httpx.HTTPError as exc:  # it had the request, and was lost before it answered
                self.take_out(instance, f"lost while answering: {exc!r}")
                return error_response(502, "the engine instance serving this request was lost before it answered; "
                                      "retry", code="instance_lost")
            self.charge(instance, service_class, payload)
            return StreamingResponse(
                self._relay(upstream, instance), status_code=upstream.status_code,
                headers={k: v for k, v in upstream.headers.items() if k.lower() in _FORWARDED_RESPONSE_HEADERS},
                background=BackgroundTask(upstream.aclose))
        return error_response(503, "no engine instance is available", code="no_instance",
                              headers={"Retry-After": str(max(1, round(self.poll_interval_s)))})

    async def instance_metrics(self, own: frozenset[str] = frozenset()) -> list[Metric]:
        """The live instances' metrics summed, sample by sample (same name and labels); the gauges of _MEAN_GAUGES
        averaged. An instance that does not answer within _METRICS_TIMEOUT_S is left out of this scrape. Families
        named in `own` are left out: the router has its own (the batches it keeps)."""
        async def scrape(instance: Instance) -> list[Metric]:
            try:
                response = await self.client.get(f"{instance.url}/metrics", timeout=_METRICS_TIMEOUT_S)
                response.raise_for_status()
                return list(text_string_to_metric_families(response.text))
            except (httpx.HTTPError, ValueError) as exc:  # unreachable, or not Prometheus text
                logger.warning("metrics of engine instance %s left out: %r", instance.url, exc)
                return []

        scraped = await asyncio.gather(*(scrape(i) for i in self.instances if i.alive))
        families: dict[str, Metric] = {}
        totals: dict[tuple[str, str, tuple], list[float]] = {}
        for instance_families in scraped:
            for family in instance_families:
                if family.name.endswith("_created") or family.name in own:  # creation times: no sum means anything
                    continue
                families.setdefault(family.name, family)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    totals.setdefault(key, []).append(sample.value)
        merged = {name: Metric(name, family.documentation, family.type) for name, family in families.items()}
        for (family, sample, labels), values in totals.items():
            value = sum(values) / len(values) if family in _MEAN_GAUGES else sum(values)
            merged[family].add_sample(sample, dict(labels), value)
        return list(merged.values())

    async def _relay(self, upstream: httpx.Response, instance: Instance):
        """The instance's answer as it comes; if the instance is lost meanwhile, a stream ends with an error event
        (a whole answer cut short cannot be mended: its client sees the connection end)."""
        try:
            async for data in upstream.aiter_bytes():
                yield data
        except httpx.HTTPError as exc:
            self.take_out(instance, f"lost while answering: {exc!r}")
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                body = error_body(502, "the engine instance serving this stream was lost", code="instance_lost")
                yield f"\n\ndata: {body}\n\ndata: [DONE]\n\n".encode()
            else:
                raise


def build_router_app(router: Router, api_keys: APIKeys | None = None, batch_db: str | Path | BatchStore | None = None,
                     batch_limits: BatchLimits | None = None, router_key: str | None = None) -> FastAPI:
    """The router's app: the instances' API, and the Files and Batches routes of its own batch service, whose lines
    run on the instances (with `router_key`, the key the instances were started with). Batches are kept in
    `batch_db` (a path, or a store opened already; None: a temporary one, gone with the app)."""
    batch_limits = batch_limits or BatchLimits(max_line_bytes=router.limits.max_body_bytes)
    temporary = tempfile.mkdtemp(prefix="omniserve-batches-") if batch_db is None else None
    store = batch_db if isinstance(batch_db, BatchStore) else BatchStore(
        batch_db if temporary is None else Path(temporary) / "batches.db")
    batches = BatchService(store, RemoteLineRunner(router, router_key), batch_limits)
    BatchCollector(batches, router.registry)
    router.on_instance_in = batches.wake

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.poll_once()  # know the instances before the first request, and the first batch line
        poller = asyncio.create_task(router.poll_forever())
        try:
            await batches.start()
            yield
        finally:
            await batches.stop()  # lines in flight end now, and stay pending for the next start
            poller.cancel()
            await router.client.aclose()
            store.close()
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)

    # The instances' API, document included: the router answers as one of them would.
    app = FastAPI(title="omniserve router", lifespan=lifespan, openapi_url=None)
    app.state.router = router
    app.state.batches = batches
    app.add_middleware(RequestContextMiddleware, state=router, api_keys=api_keys,
                       upload_limit=batch_limits.max_file_bytes + MULTIPART_SLACK_BYTES)
    add_error_handlers(app)
    _add_status_routes(app, router)
    add_batch_routes(app, batches)

    async def forwarded(request: Request) -> Response:
        return await router.forward(request, request.url.path)

    for path, method in _FORWARDED_ROUTES:
        app.add_api_route(path, forwarded, methods=[method], include_in_schema=False)
    return app


def _add_status_routes(app: FastAPI, router: Router) -> None:
    @app.get("/health")
    async def health() -> Response:
        if any(i.alive for i in router.instances):
            return Response(status_code=200)
        return error_response(503, "no engine instance is available", code="no_instance")

    @app.get("/load")
    async def load() -> dict:
        return {"instances": [{"url": i.url, "alive": i.alive, **i.report} for i in router.instances]}

    @app.get("/metrics")
    async def metrics() -> Response:
        """The router's own metrics, then the instances' summed (see Router.instance_metrics)."""
        own = frozenset(metric.name for metric in router.registry.collect())
        registry = CollectorRegistry()
        registry.register(_Families(await router.instance_metrics(own)))
        return Response(generate_latest(router.registry) + generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Families:
    """A collector of metric families made already (the instances' merged ones)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class DrainingRouter(uvicorn.Server):
    """uvicorn's server for the router, except that SIGTERM/SIGINT drains: new requests get 503 at once, `drain`
    (the instances' drains, on a thread: they end the streams still running after their grace period, and the
    router passes those ends on) runs, and the router exits once it has returned. Without `drain` (instances
    started elsewhere, which drain on their own signals) it exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, router: Router, drain: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._router, self._drain = router, drain
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain is None or self._draining is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        logger.warning("draining: the engine instances finish what they run (grace period %.0f s)",
                       self._router.drain_grace_s)
        self._router.draining = True
        self._draining = threading.Thread(target=self._drain, daemon=True)
        self._draining.start()

    async def on_tick(self, counter: int) -> bool:
        if self._draining is not None and not self._draining.is_alive():
            self.should_exit = True
        return await super().on_tick(counter)


def run_router(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               drain: Callable[[], None] | None = None, drain_grace_s: float = 30.0) -> None:
    """Serves the router until SIGTERM or SIGINT, then drains (DrainingRouter)."""
    import sys

    from omniserve.entrypoints.openai import listen_socket

    router: Router = app.state.router
    router.drain_grace_s = drain_grace_s
    sock = listen_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    urls = ", ".join(i.url for i in router.instances)
    print(f"omniserve: routing to {urls} on http://{bound_host}:{bound_port}", file=sys.stderr, flush=True)
    DrainingRouter(router_config(app, log_level), router, drain).run(sockets=[sock])


def router_config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    # Once drained, connections still open get a few seconds to finish their last writes.
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
