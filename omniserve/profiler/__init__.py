"""The profiler: measures the device and the CPU attention pool and fits the scheduler's latency model
(omniserve.engine.scheduler.latency_model) to the measurements.

    profiled_latency_model   what builders of an LLMEngine hand it as its latency model (cached, or profiled now)
    load_or_profile          a setup's profile, from the cache or measured
    profile_model            measures every latency model

Imported on first use: the package itself loads without torch."""

from omniserve.lazy import lazy_exports

_EXPORTS = {name: "omniserve.profiler.profiler"
            for name in ("profiled_latency_model", "load_or_profile", "profile_model", "cache_dir")}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
