"""Prometheus metrics, with vLLM's names where vLLM has the metric and `omniserve:` where it has not, and a
`service_class` label (ls/be) on everything per request.

All of it is recorded on the engine thread after each iteration (AsyncEngine's on_iteration hook), from the
iteration's outputs and the engine's own counters, so nothing here runs on the request path.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_ITERATION_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_LAYERS_PER_ITERATION_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._add_request_metrics()
        self._add_engine_gauges()
        self._last_token: dict[str, float] = {}  # request id -> time of its previous token, for inter-token latency
        self._busy_share = 0.0
        self._slo_counts: dict[tuple[str, str], list[int]] = {}  # labels -> [requests with SLOs, attained]

    def _add_request_metrics(self) -> None:
        """Per request, labelled with its model name and service class: latencies, tokens, ends, SLOs met."""
        registry, per_request = self.registry, ["model_name", "service_class"]

        def histogram(name: str, doc: str, buckets=_LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, per_request, buckets=buckets, registry=registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to last token")
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first device time")
        self._add_offloaded_token_histograms(histogram)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", per_request,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", per_request, registry=registry)
        self.finished = Counter("vllm:request_success", "Finished requests by reason",
                                per_request + ["finished_reason"], registry=registry)
        self.slo_requests = Counter("omniserve:slo_requests", "Finished LS requests that had SLOs", per_request,
                                    registry=registry)
        self.slo_attained = Counter("omniserve:slo_attained", "... of them, those that met their TTFT and TPOT SLOs",
                                    per_request, registry=registry)
        self.slo_attainment = Gauge("omniserve:slo_attainment", "slo_attained / slo_requests so far", per_request,
                                    registry=registry)

    def _add_engine_gauges(self) -> None:
        """The engine's state after each iteration: queues, KV use, admission, the latency model, the CPU pool."""
        registry, gauge_labels = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests on the device", gauge_labels, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued", gauge_labels, registry=registry)
        self.offloaded = Gauge("omniserve:num_requests_offloaded", "Requests decoding in the CPU attention pool",
                               gauge_labels, registry=registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of device KV pages in use (0-1)", gauge_labels,
                              registry=registry)
        self.host_kv = Gauge("omniserve:host_kv_cache_requests", "Requests whose KV cache is in host memory",
                             gauge_labels, registry=registry)
        self.preemptions = Gauge("vllm:num_preemptions", "Preemptions so far", gauge_labels, registry=registry)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                      "(each request once, when it starts)", gauge_labels, registry=registry)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "... of them, tokens found there (not computed)",
                                   gauge_labels, registry=registry)
        self.prefix_pages = Gauge("omniserve:prefix_cache_pages", "Device KV pages in the prefix cache (held by "
                                  "requests or idle; idle ones count as free)", gauge_labels, registry=registry)
        self.host_prefix_pages = Gauge("omniserve:host_prefix_cache_pages", "Pages the prefix cache's host tier "
                                       "holds (--kv-offloading-size)", gauge_labels, registry=registry)
        self._prefix_counted = (0, 0)  # the scheduler's queries and hits already added to the counters
        self.rejections = Gauge("omniserve:num_rejections", "LS requests rejected at admission so far", gauge_labels,
                                registry=registry)
        self.rejected_in_a_row = Gauge(
            "omniserve:ls_rejected_in_a_row", "LS requests rejected at admission since the last one admitted "
            "(growing without end: admission rejects everything; check the SLOs and the profile)", gauge_labels,
            registry=registry)
        self.time_correction = Gauge(
            "omniserve:latency_model_correction", "Measured / profiled iteration time lately (scales every "
            "prediction; far from 1: the profile no longer describes the machine)", gauge_labels, registry=registry)
        self.pool_depth = Gauge("omniserve:cpu_pool_queue_depth", "Offloaded rows out in the CPU attention pool",
                                gauge_labels, registry=registry)
        self.host_kv_used = Gauge("omniserve:host_kv_used_bytes", "Host KV bytes counted on by offloaded requests and "
                                  "the prefix cache's host tier, per host of the CPU attention pool",
                                  [*gauge_labels, "host"], registry=registry)
        self.host_kv_free = Gauge("omniserve:host_kv_free_bytes", "Host KV bytes of a host's budget not counted on "
                                  "yet", [*gauge_labels, "host"], registry=registry)
        self.host_kv_allocated = Gauge(
            "omniserve:host_kv_allocated_bytes", "Host KV bytes the CPU attention workers of a host hold now (tensors "
            "allocated, room to grow included), per host", [*gauge_labels, "host"], registry=registry)
        self.pool_utilization = Gauge(
            "omniserve:cpu_pool_utilization", "Share of the last iterations with offloaded rows in flight",
            gauge_labels, registry=registry)

    def _add_offloaded_token_histograms(self, histogram) -> None:
        # Per offloaded (CPU-attention) token: how the piggybacking pipeline carried it through the layers.
        self.offloaded_iterations = histogram(
            "omniserve:offloaded_token_iterations", "Iterations an offloaded token took through all layers",
            _ITERATION_BUCKETS)
        self.offloaded_seconds = histogram(
            "omniserve:offloaded_token_seconds",
            "Seconds an offloaded token took from entering layer 0 to being sampled")
        self.offloaded_layers = histogram(
            "omniserve:offloaded_token_layers_per_iteration",
            "Layers an offloaded token advanced per iteration, on average over its layers",
            _LAYERS_PER_ITERATION_BUCKETS)

    def on_iteration(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            self._record_request(output, now)
        if len(self._last_token) > 2 * len(engine.unfinished_request_ids) + 64:  # forget aborted requests
            self._last_token = {r: t for r, t in self._last_token.items() if r in engine.unfinished_request_ids}
        scheduler, model = engine.scheduler, self.model_name
        running = sum(1 for r in scheduler.running if r.placement.value == "device")
        self.running.labels(model).set(running)
        self.waiting.labels(model).set(len(scheduler.waiting))
        self.offloaded.labels(model).set(len(scheduler.offloaded))
        self.host_kv.labels(model).set(len(scheduler.offloaded))
        self.kv_usage.labels(model).set(engine.allocator.num_used / engine.allocator.num_pages)
        self.preemptions.labels(model).set(scheduler.stats.num_preemptions)
        self._count_prefix_cache(engine)
        self.rejections.labels(model).set(scheduler.stats.num_rejected)
        self.rejected_in_a_row.labels(model).set(scheduler.admission.ls_rejected_in_a_row)
        self.time_correction.labels(model).set(scheduler.correction.value)
        in_flight = engine.runner.num_offloaded_in_flight
        self.pool_depth.labels(model).set(in_flight)
        # An exponential average over about 100 iterations of "was the pool working for us": cheap, and it needs no
        # call into the worker processes.
        self._busy_share += 0.01 * ((1.0 if in_flight else 0.0) - self._busy_share)
        self.pool_utilization.labels(model).set(self._busy_share)
        for timing in scheduler.take_offloaded_token_timings():  # drained every iteration: the list stays short
            labels = (model, timing.service_class)
            self.offloaded_iterations.labels(*labels).observe(timing.iterations)
            self.offloaded_seconds.labels(*labels).observe(timing.seconds)
            self.offloaded_layers.labels(*labels).observe(timing.layers_per_iteration)

    def on_load_report(self, report: dict) -> None:
        """The host KV gauges, from the engine's load report (made at most every 50 ms while it runs: it walks the
        offloaded requests)."""
        for host, memory in report["host_kv"].items():
            self.host_kv_used.labels(self.model_name, host).set(memory["budget_bytes"] - memory["free_bytes"])
            self.host_kv_free.labels(self.model_name, host).set(memory["free_bytes"])
            self.host_kv_allocated.labels(self.model_name, host).set(memory["allocated_bytes"])

    def _count_prefix_cache(self, engine: LLMEngine) -> None:
        stats, model = engine.scheduler.stats, self.model_name
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if (queries, hits) != self._prefix_counted:
            self.prefix_queries.labels(model).inc(queries - self._prefix_counted[0])
            self.prefix_hits.labels(model).inc(hits - self._prefix_counted[1])
            self._prefix_counted = (queries, hits)
        device_pages, host_pages = engine.prefix_cache_pages
        self.prefix_pages.labels(model).set(device_pages)
        self.host_prefix_pages.labels(model).set(host_pages)

    def _record_request(self, output: RequestOutput, now: float) -> None:
        metrics = output.metrics
        if metrics is None:
            return
        labels = (self.model_name, metrics.service_class)
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            self.generation_tokens.labels(*labels).inc(new_tokens)
            previous = self._last_token.get(output.request_id)
            if previous is None and metrics.first_token_time is not None:
                self.ttft.labels(*labels).observe(metrics.first_token_time - metrics.arrival_time)
                if metrics.first_scheduled_time is not None:
                    self.queue_time.labels(*labels).observe(metrics.first_scheduled_time - metrics.arrival_time)
            elif previous is not None:
                self.itl.labels(*labels).observe(now - previous)
            self._last_token[output.request_id] = now
        if not output.finished:
            return
        self._last_token.pop(output.request_id, None)
        reason = output.outputs[0].finish_reason or "unknown"
        self.finished.labels(*labels, reason).inc()
        self.prompt_tokens.labels(*labels).inc(len(output.prompt_token_ids))
        if metrics.last_token_time is not None:
            self.e2e.labels(*labels).observe(metrics.last_token_time - metrics.arrival_time)
        if metrics.ttft_slo is None and metrics.tpot_slo is None:
            return
        met = reason != "rejected" and _met_slos(output)
        self.slo_requests.labels(*labels).inc()
        self.slo_attained.labels(*labels).inc(met)
        counts = self._slo_counts.setdefault(labels, [0, 0])
        counts[0] += 1
        counts[1] += met
        self.slo_attainment.labels(*labels).set(counts[1] / counts[0])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _met_slos(output: RequestOutput) -> bool:
    """TTFT within its SLO, and the mean time per output token after the first within its SLO."""
    metrics = output.metrics
    if metrics.first_token_time is None:
        return False
    if metrics.ttft_slo is not None and metrics.first_token_time - metrics.arrival_time > metrics.ttft_slo:
        return False
    tokens = max(len(c.token_ids) for c in output.outputs)
    if metrics.tpot_slo is not None and tokens > 1:
        tpot = (metrics.last_token_time - metrics.first_token_time) / (tokens - 1)
        return tpot <= metrics.tpot_slo
    return True
