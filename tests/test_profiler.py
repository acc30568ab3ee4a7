"""The latency models (pure logic) and the profiler that measures them on a tiny model."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from omniserve.entrypoints import cli
from omniserve.models.loader import load_model
from omniserve.engine.scheduler.latency_model import (
    BatchShape, LatencyModel, LinearModel, PiecewiseLinear, batch_shape_of_chunks, prefill_interactions,
)
from omniserve.profiler import profiler
from omniserve.profiler.profiler import ProfileError, bisect_piecewise, load_or_profile, nondecreasing, profile_model

CPU = torch.device("cpu")


def _latency_model(**overrides) -> LatencyModel:
    fields = dict(
        num_layers=4,
        dense=PiecewiseLinear((1.0, 100.0), (1.0, 100.0)),  # 1 s per row, per layer
        prefill_attention=LinearModel(0.0, (0.001, 0.0)),
        decode_attention=LinearModel(0.5, (0.01, 0.1)),
        head=LinearModel(2.0, (0.25,)),
        cpu_attention=LinearModel(0.001, (1e-6, 1e-4)),
    )
    return LatencyModel(**(fields | overrides))


# --------------------------------------------------------------------------------------------------- bisection
def test_bisection_finds_the_steps_of_a_ladder_with_few_measurements():
    def ladder(n: int) -> float:  # a step every 128 rows, like a GPU adding a wave of thread blocks
        return 1.0 + 0.5 * (n // 128)

    measured: dict[int, float] = {}
    calls = []
    fitted = bisect_piecewise(lambda n: calls.append(n) or ladder(n), 1, 1024, min_gap=4, max_gap=128,
                              measurements=measured)
    assert len(calls) == len(set(calls)) == len(measured)  # each point measured once
    assert len(calls) < 0.1 * 1024
    away_from_edges = [n for n in range(1, 1025) if min(abs(n - 128 * k) for k in range(9)) > 4]
    assert max(abs(fitted(n) - ladder(n)) / ladder(n) for n in away_from_edges) < 0.03
    # Without max_gap the regular staircase looks straight at every midpoint: the limitation max_gap exists for.
    coarse = bisect_piecewise(ladder, 1, 1024, min_gap=4)
    assert len(coarse.xs) == 2


def test_bisection_of_a_linear_function_takes_three_measurements():
    calls = []
    fitted = bisect_piecewise(lambda n: calls.append(n) or 2.0 + 3.0 * n, 1, 1000)
    assert sorted(calls) == [1, 500, 1000]
    assert fitted(250) == pytest.approx(752.0)


def test_bisection_splits_wide_segments_and_stops_at_min_gap():
    calls = []
    bisect_piecewise(lambda n: calls.append(n) or float(n), 0, 64, max_gap=16)
    assert {0, 16, 32, 48, 64} <= set(calls)
    jump = bisect_piecewise(lambda n: 1.0 if n < 37 else 2.0, 0, 64, min_gap=1)
    assert 36.0 in jump.xs and 37.0 in jump.xs  # a single step is located exactly


def test_nondecreasing_averages_dips():
    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == (1.0, 2.5, 2.5, 4.0)
    assert nondecreasing([1.0, 2.0]) == (1.0, 2.0)


# ----------------------------------------------------------------------------------------------- latency model
def test_piecewise_linear_interpolates_and_extrapolates():
    f = PiecewiseLinear((1.0, 3.0, 5.0), (1.0, 3.0, 4.0))
    assert f(2) == pytest.approx(2.0)
    assert f(4) == pytest.approx(3.5)
    assert f(7) == pytest.approx(5.0)  # the last segment, extended
    assert f(0) == pytest.approx(0.0)  # the first one, extended
    assert PiecewiseLinear((1.0, 2.0), (1.0, 5.0))(-10) == 0.0  # never below 0
    with pytest.raises(ValueError):
        PiecewiseLinear((2.0, 1.0), (1.0, 1.0))


def test_linear_model_fit_recovers_known_coefficients():
    features = [(float(a), float(b)) for a in range(0, 50, 7) for b in range(1, 9, 3)]
    seconds = [0.25 + 0.003 * a + 0.04 * b for a, b in features]
    fitted = LinearModel.fit(features, seconds)
    assert fitted.intercept == pytest.approx(0.25)
    assert fitted.slopes == pytest.approx((0.003, 0.04))
    assert fitted(10, 2) == pytest.approx(0.25 + 0.03 + 0.08)
    assert LinearModel(-1.0, (1.0,))(0.5) == 0.0  # never below 0


def test_nonnegative_fit_drops_a_slope_that_noise_made_negative():
    features = [(float(a), float(b)) for a in range(10) for b in range(5)]
    seconds = [1.0 + 0.5 * a - 0.01 * b for a, b in features]
    fitted = LinearModel.fit(features, seconds, nonnegative=True)
    assert fitted.slopes[1] == 0.0 and fitted.slopes[0] == pytest.approx(0.5)
    assert fitted.intercept >= 0


def test_prefill_interactions_and_batch_shape_of_chunks():
    assert prefill_interactions(0, 3) == 1 + 2 + 3
    assert prefill_interactions(10, 2) == 11 + 12
    chunks = [
        SimpleNamespace(token_ids=[5], start_position=99, sample=True),  # a decode with context 100
        SimpleNamespace(token_ids=[1, 2, 3], start_position=0, sample=True),
        SimpleNamespace(token_ids=[1] * 4, start_position=8, sample=False),  # a middle chunk of a long prompt
        SimpleNamespace(token_ids=[7], start_position=9, sample=True),
    ]
    assert batch_shape_of_chunks(chunks) == BatchShape(
        num_rows=9, prefill_interactions=6 + prefill_interactions(8, 4), decode_context=110, num_decodes=2,
        num_sampled=3, prefill_tokens=7,
    )


def test_iteration_time_adds_extra_rows_per_layer():
    model = _latency_model()
    shape = BatchShape(num_rows=10, prefill_interactions=1000, decode_context=20, num_decodes=2, num_sampled=3)
    layer = 10.0 + 1.0 + (0.5 + 0.2 + 0.2)
    assert model.layer_time(shape, 0) == pytest.approx(layer)
    assert model.iteration_time(shape) == pytest.approx(2.75 + 4 * layer)
    extra = BatchShape(**(vars(shape) | {"extra_rows": (0, 3, 1)}))
    assert model.layer_time(extra, 1) == pytest.approx(layer + 3)
    assert model.layer_time(extra, 3) == pytest.approx(layer)  # missing entries are 0
    assert model.iteration_time(extra) == pytest.approx(2.75 + 4 * layer + 4)
    assert model.iteration_time(BatchShape()) == pytest.approx(2.0)  # the fixed overhead only
    assert model.dense_time(0) == model.decode_attention_time(0, 0) == model.cpu_attention_time(0, 0) == 0.0


def test_latency_model_json_round_trip_is_exact():
    model = _latency_model(
        dense=PiecewiseLinear((1.0, 17.0, 2048.0), (1 / 3, 0.1 + 0.2, 1e-300)),
        accuracy={"dense": {"median_rel_error": 0.01, "p90_rel_error": 0.05, "points": 8}},
        metadata={"model": "tiny", "device": "cpu"},
    )
    assert LatencyModel.from_json(model.to_json()) == model
    assert json.loads(model.to_json())["num_layers"] == 4


# ---------------------------------------------------------------------------------------------------- profiler
@pytest.fixture
def one_thread():
    """One torch thread while timing: on a shared two-core machine a second thread that waits for a busy core turns
    microseconds into scheduler ticks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return load_model(tiny_model_dirs["llama"][0], CPU, torch.float32, None, "auto", 0).model


PROFILE_SETTINGS = dict(max_num_tokens=128, max_context=256, page_size=16, pool_config=None, progress=False)


def test_profiling_a_tiny_model_gives_positive_monotone_predictions(tiny_llama, one_thread):
    latency = profile_model(tiny_llama, CPU, torch.float32, **PROFILE_SETTINGS)
    assert latency.num_layers == tiny_llama.config.num_layers
    assert set(latency.accuracy) == {"dense", "prefill_attention", "decode_attention", "head", "cpu_attention",
                                    "swap_out"}
    assert all(a["points"] > 0 and math.isfinite(a["median_rel_error"]) for a in latency.accuracy.values())
    rows = [1, 2, 8, 32, 64, 128, 512]
    dense = [latency.dense_time(n) for n in rows]
    assert all(t > 0 for t in dense) and dense == sorted(dense) and dense[-1] > dense[0]
    decode = [latency.decode_attention_time(16 * k, k) for k in (1, 4, 16, 64)]
    assert all(t > 0 for t in decode) and decode == sorted(decode) and decode[-1] > decode[0]
    longer = [latency.decode_attention_time(c, 4) for c in (4, 64, 256, 1024)]
    assert longer == sorted(longer)
    prefill = [latency.prefill_attention_time(prefill_interactions(0, n), n) for n in (2, 16, 128)]
    assert all(t > 0 for t in prefill) and prefill == sorted(prefill)
    cpu = [latency.cpu_attention_time(64 * k, k) for k in (1, 8, 32)]
    assert all(t > 0 for t in cpu) and cpu == sorted(cpu)
    head = [latency.head_time(n) for n in (0, 1, 64)]
    assert head[0] > 0 and head == sorted(head)
    assert latency.metadata["device"] == "cpu" and int(latency.metadata["measurements"]) > 20
    decode_step = BatchShape(num_rows=4, decode_context=100, num_decodes=4, num_sampled=4)
    assert latency.iteration_time(decode_step) > latency.num_layers * latency.dense_time(4)


@pytest.fixture
def busy_machine_ok(monkeypatch):
    """Any profile is plausible: these tests are about caching and the command, and the machine may be busy."""
    monkeypatch.setattr(profiler, "_IMPLAUSIBLE_MEDIAN_ERROR", math.inf)


def test_load_or_profile_writes_the_cache_and_loads_it_next_time(tiny_llama, one_thread, tmp_path, monkeypatch,
                                                                  busy_machine_ok):
    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(tmp_path))
    first = load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny-llama", path=None, **PROFILE_SETTINGS)
    written = list((tmp_path / "profiles").glob("*.json"))
    assert len(written) == 1 and written[0].name.startswith("tiny-llama-cpu-float32-")
    assert first.metadata["model"] == "tiny-llama"

    def must_not_profile(*args, **kwargs):
        raise AssertionError("profiled again instead of loading the cache")

    monkeypatch.setattr(profiler, "profile_model", must_not_profile)
    assert load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny-llama", path=None,
                           **PROFILE_SETTINGS) == first
    # An explicit path that exists is loaded as it is.
    explicit = tmp_path / "mine.json"
    explicit.write_text(first.to_json())
    assert load_or_profile(tiny_llama, CPU, torch.float32, model_name="other", path=str(explicit),
                           **PROFILE_SETTINGS) == first


def test_profile_cli_writes_a_profile(tiny_model_dirs, one_thread, tmp_path, capsys, monkeypatch, busy_machine_ok):
    """The default placement has a CPU attention pool: its worker is profiled for real."""
    output = tmp_path / "profile.json"
    args = ["profile", "--model", tiny_model_dirs["llama"][0], "--max-num-batched-tokens", "64", "--max-model-len",
            "128", "--output", str(output)]
    cli.main(args)
    latency = LatencyModel.from_json(output.read_text())
    assert latency.num_layers == 2 and latency.dense_time(64) > 0
    assert latency.metadata["cpu_attention"] == "pool round trip" and latency.cpu_attention_time(100, 2) > 0
    printed = capsys.readouterr().out
    assert f"written to {output}" in printed and "decode_attention" in printed

    profiled = []
    monkeypatch.setattr(profiler, "profile_model", lambda *a, **k: profiled.append(k) or latency)
    cli.main(args)  # cached: loaded, not profiled
    assert not profiled and f"loaded from {output}" in capsys.readouterr().out
    cli.main(args + ["--force", "--be-decode-placement", "device"])
    assert len(profiled) == 1 and profiled[0]["pool_config"] is None and profiled[0]["max_num_tokens"] == 64


def _with_error(latency: LatencyModel, median: float) -> LatencyModel:
    return replace(latency, accuracy={name: {**a, "median_rel_error": median} for name, a in latency.accuracy.items()})


def test_an_implausible_profile_is_measured_again_then_refused(tiny_llama, one_thread, tmp_path, monkeypatch, caplog):
    """A profile whose held-out error says its own measurements disagree (taken while another job used the cores)
    is measured again; if it never becomes plausible, `omniserve profile` is refused with a message saying what to
    do, and an engine starting serves with the best attempt."""
    good = profile_model(tiny_llama, CPU, torch.float32, **PROFILE_SETTINGS)
    attempts = []
    answers = [_with_error(good, 4.4), _with_error(good, 0.03)]  # busy, then quiet again
    monkeypatch.setattr(profiler, "profile_model", lambda *a, **k: attempts.append(1) or answers[len(attempts) - 1])
    target = tmp_path / "profile.json"
    with caplog.at_level(logging.WARNING):
        latency = load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny", path=str(target),
                                  **PROFILE_SETTINGS)
    assert len(attempts) == 2 and latency.accuracy["dense"]["median_rel_error"] == 0.03
    assert "implausible" in caplog.text
    # A cached profile that is implausible is not used as it is either: it is measured again. One the user named
    # is theirs: used, with a warning.
    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(tmp_path))
    cached = profiler.profile_cache_path("tiny", tiny_llama, CPU, torch.float32, **{
        k: v for k, v in PROFILE_SETTINGS.items() if k != "progress"})
    cached.parent.mkdir(parents=True)
    cached.write_text(_with_error(good, 4.4).to_json())
    attempts.clear()
    answers[:] = [_with_error(good, 0.05)]
    assert load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny", path=None,
                           **PROFILE_SETTINGS).accuracy["dense"]["median_rel_error"] == 0.05
    assert len(attempts) == 1
    caplog.clear()
    target.write_text(_with_error(good, 4.4).to_json())
    with caplog.at_level(logging.WARNING):
        named = load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny", path=str(target),
                                **PROFILE_SETTINGS)
    assert named.accuracy["dense"]["median_rel_error"] == 4.4 and len(attempts) == 1
    assert "using it as given" in caplog.text
    # Never plausible: a clear refusal, nothing written.
    target.unlink()
    attempts.clear()
    monkeypatch.setattr(profiler, "profile_model", lambda *a, **k: attempts.append(1) or _with_error(good, 4.4))
    with pytest.raises(ProfileError, match="could not be measured reliably.*440%.*--profile-path"):
        load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny", path=str(target), **PROFILE_SETTINGS)
    assert len(attempts) == 3 and not target.exists()
    # An engine starting (strict=False) serves with the best attempt instead, says so, and writes nothing: its
    # calibration and measured iterations scale the predictions (test_slo_engine), and the next start measures again.
    attempts.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        best = load_or_profile(tiny_llama, CPU, torch.float32, model_name="tiny", path=str(target), strict=False,
                               **PROFILE_SETTINGS)
    assert len(attempts) == 3 and best.accuracy["dense"]["median_rel_error"] == 4.4 and not target.exists()
    assert "serving with the best of 3 attempts" in caplog.text
