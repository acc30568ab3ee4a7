"""The profiler's entry points: profile_model measures every latency model (the measurements are in measure.py,
the fits in fitting.py); load_or_profile keeps the result in a cache keyed by everything that changes it, and
measures again when a profile's own held-out error says it was taken on a busy machine; profiled_latency_model is
what an engine's builders hand it as its latency model."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omniserve import ops
from omniserve.config import ConfigError, cache_dir
from omniserve.cpu_attention import PoolConfig
from omniserve.engine.args import EngineArgs
from omniserve.engine.scheduler.latency_model import LatencyModel
from omniserve.models.llama import LlamaForCausalLM
from omniserve.models.loader import LoadedModel
from omniserve.profiler.fitting import accuracy_summary, bisect_piecewise, nondecreasing, relative_errors
from omniserve.profiler.measure import ModelProfiler

logger = logging.getLogger(__name__)

_IMPLAUSIBLE_MEDIAN_ERROR = 0.5
"""A latency model whose held-out median relative error is above this was measured while something else used the
machine (a quiet machine gives 0.02-0.2): its predictions would reject or overfill iterations, so it is measured
again."""
_PROFILE_ATTEMPTS = 3


class ProfileError(ConfigError):
    """A profile that cannot be trusted, with what to do about it."""


# ------------------------------------------------------------------------------------------------ entry points
def profile_model(
    model: LlamaForCausalLM,
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_num_tokens: int,
    max_context: int,
    page_size: int,
    pool_config: PoolConfig | None,
    progress: bool = True,
) -> LatencyModel:
    """Measures every latency model on `model` (on `device`, in `dtype`) and the CPU attention pool."""
    if max_num_tokens < 1 or max_context < 2 or page_size < 1:
        raise ValueError("profiling needs max_num_tokens >= 1, max_context >= 2 and page_size >= 1")
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(desc="Profiling", unit=" timings", disable=not progress) as bar:
        profiler = ModelProfiler(model, device, dtype, max_num_tokens, max_context, page_size, bar)
        dense = profiler.dense()
        prefill = profiler.prefill_attention()
        decode = profiler.decode_attention()
        head = profiler.head()
        cpu = profiler.cpu_attention(pool_config)
        swap = profiler.swap_out()
    seconds = time.perf_counter() - started
    metadata = {
        "model": model.config.architecture,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "max_num_tokens": str(max_num_tokens),
        "max_context": str(max_context),
        "page_size": str(page_size),
        "cpu_attention": "pool round trip" if pool_config else "in-process kernel (no pool)",
        "measurements": str(profiler.time.measurements),
        "profiling_seconds": f"{seconds:.1f}",
    }
    return LatencyModel(model.config.num_layers, dense, prefill, decode, head, cpu, swap, profiler.accuracy, metadata)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


_PROFILE_FORMAT = 5
"""Bumped when the models' features or the runner's kernels change (4: fused operators, one prefill call; 5: the
CPU's decode GEMM and decode path), so that older cached profiles, measured on other code, are not reused."""


def profile_cache_path(model_name: str, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, *,
                       max_num_tokens: int, max_context: int, page_size: int,
                       pool_config: PoolConfig | None) -> Path:
    """Where load_or_profile keeps this setup's profile: a readable prefix and a hash of everything that changes it."""
    pool = None if pool_config is None else (pool_config.threads_per_worker, pool_config.simulated_delay_s)
    key = repr((_PROFILE_FORMAT, model_name, model.config, device_name(device), device.type, str(dtype),
                torch.get_num_threads(), max_num_tokens, max_context, page_size, pool, ops.CPU_KERNELS_BUILT))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    readable = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(model_name).name)[:40] or "model"
    prefix = f"{readable}-{device.type}-{str(dtype).removeprefix('torch.')}"
    return cache_dir() / "profiles" / f"{prefix}-{digest}.json"


def load_or_profile(
    model: LlamaForCausalLM,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_name: str,
    path: str | os.PathLike | None,
    max_num_tokens: int,
    max_context: int,
    page_size: int,
    pool_config: PoolConfig | None,
    progress: bool = True,
    force: bool = False,
    strict: bool = True,
) -> LatencyModel:
    """The profile at `path` (or in the cache when path is None); profiled and written there when it is missing, or
    when force is set. A cached profile whose held-out error is implausible is measured again; one the user named
    is used as given, with a warning (the engine's measured iterations then correct its predictions). A profile that
    stays implausible however often it is measured (a busy machine) is a ProfileError when `strict`; otherwise (an
    engine starting) the best attempt is used, with a warning, and not written: the next start measures again."""
    settings = dict(max_num_tokens=max_num_tokens, max_context=max_context, page_size=page_size,
                    pool_config=pool_config)
    target = Path(path) if path is not None else profile_cache_path(model_name, model, device, dtype, **settings)
    if target.is_file() and not force:
        latency = LatencyModel.from_json(target.read_text())
        bad = implausible_models(latency)
        if not bad:
            logger.info("latency model loaded from %s (%s)", target, format_accuracy(latency))
            return latency
        problem = (f"the latency model in {target} is implausible ({', '.join(bad)}: held-out median error above "
                   f"{100 * _IMPLAUSIBLE_MEDIAN_ERROR:.0f}%, measured on a busy machine?)")
        if path is not None:
            logger.warning("%s; using it as given, corrected by measured iterations", problem)
            return latency
        logger.warning("%s; measuring it again", problem)
    latency = _profile_until_plausible(model, device, dtype, strict, progress=progress, **settings)
    latency = replace(latency, metadata={**latency.metadata, "model": model_name})
    if implausible_models(latency):
        return latency  # the best of a busy machine's attempts: for this run only
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(latency.to_json())
    partial.replace(target)  # never leave half a file where the next start would load it
    logger.info("latency model written to %s (%s)", target, format_accuracy(latency))
    return latency


def profiled_latency_model(args: EngineArgs, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                           pool_config: PoolConfig | None) -> LatencyModel:
    """The latency model an engine of `args` schedules with (what LLM, `omniserve serve` and the scale-out instances
    hand LLMEngine as its `latency_model`): the profile at args.profile_path, or the one cached for this model,
    device, dtype and setup, measured now when there is none. The engine calls it only when its policy and SLOs
    need a latency model."""
    return load_or_profile(
        loaded.model, device, dtype, model_name=str(loaded.path or args.model), path=args.profile_path,
        strict=False, **args.profile_settings(loaded.config.max_context, pool_config))


def implausible_models(latency: LatencyModel) -> list[str]:
    """The latency models whose held-out median relative error says the measurements disagree with each other."""
    return [name for name, summary in latency.accuracy.items()
            if summary.get("median_rel_error", 0.0) > _IMPLAUSIBLE_MEDIAN_ERROR]


def _profile_until_plausible(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, strict: bool,
                             **settings) -> LatencyModel:
    """profile_model, measured again while its held-out error is implausible (another tenant's burst passes). If it
    never becomes plausible: with `strict`, a clear error (a wrong profile kept would mislead every later start);
    without, the best attempt, with a warning: the engine's calibration and measured iterations then scale its
    predictions to the device as it is, so LS requests are judged by what the device does, never all rejected."""
    attempts: list[tuple[float, LatencyModel]] = []
    for attempt in range(1, _PROFILE_ATTEMPTS + 1):
        latency = profile_model(model, device, dtype, **settings)
        bad = implausible_models(latency)
        if not bad:
            return latency
        worst = max(latency.accuracy[name]["median_rel_error"] for name in bad)
        attempts.append((worst, latency))
        logger.warning("profile attempt %d of %d is implausible (%s); %s", attempt, _PROFILE_ATTEMPTS,
                       format_accuracy(latency), "measuring again" if attempt < _PROFILE_ATTEMPTS else "giving up")
    worst, best = min(attempts, key=lambda item: item[0])
    if not strict:
        logger.warning(
            "the latency profile could not be measured reliably (something else is using this machine's cores): "
            "serving with the best of %d attempts (%.0f%% median held-out error), not cached; the scheduler scales "
            "its predictions by measured iterations. Run `omniserve profile` when the machine is quieter.",
            _PROFILE_ATTEMPTS, 100 * worst)
        return best
    raise ProfileError(
        f"the latency profile could not be measured reliably: after {_PROFILE_ATTEMPTS} attempts its predictions "
        f"still miss held-out measurements by {100 * worst:.0f}% (median; a quiet machine gives under 20%). "
        "Something else is using this machine's cores. Profile when it is quieter (`omniserve profile`), or pass "
        "--profile-path with a profile measured on this hardware.")


def format_accuracy(latency: LatencyModel) -> str:
    """One line: each model's held-out median / p90 relative error."""
    return ", ".join(
        f"{name} {a['median_rel_error']:.3f}/{a['p90_rel_error']:.3f}" for name, a in latency.accuracy.items()
    ) + " (held-out median/p90 relative error)"


__all__ = ["ProfileError", "accuracy_summary", "bisect_piecewise", "cache_dir", "device_name", "format_accuracy",
           "implausible_models", "load_or_profile", "nondecreasing", "profile_cache_path", "profile_model",
           "relative_errors"]
