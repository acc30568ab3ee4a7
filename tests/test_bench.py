"""The serving benchmark (`omniserve bench`): arrival statistics, metrics on hand-made records, runs against the
in-process server with the tiny model (both classes, SLO rejections, JSON and plots, the policy comparison), and
runs against a deliberately broken server that must end in counted failures, not in a hang or a crash."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import replace

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fakes import MODEL
from servers import RunningServer, serving, slow_engine

from omniserve.bench import batch, compare, metrics, runner, server_metrics, slos, workload
from omniserve.bench.client import Stream, Target, request_body, run_streams
from omniserve.bench.metrics import Record, Slo
from omniserve.bench.workload import Request, StreamSpec, WorkloadError
from omniserve.engine.scheduler.latency_model import prefill_interactions
from omniserve.entrypoints.cli import main
from omniserve.entrypoints.openai.metrics import ServerMetrics


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


# ------------------------------------------------------------------------------------------------------- arrivals
@pytest.mark.parametrize("burstiness, expected_cv", [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_gamma_arrivals_have_the_rate_and_burstiness_asked(burstiness, expected_cv):
    times = workload.gamma_arrivals(random.Random(1), rate=5.0, duration=4000.0, burstiness=burstiness)
    assert len(times) / 4000.0 == pytest.approx(5.0, rel=0.05)
    assert cv(gaps(times)) == pytest.approx(expected_cv, rel=0.08)
    assert all(0 <= t < 4000.0 for t in times) and times == sorted(times)
    assert times == workload.gamma_arrivals(random.Random(1), 5.0, 4000.0, burstiness)  # seeded


def test_rate_steps_redraw_the_rate_every_period():
    times = workload.rate_step_arrivals(random.Random(2), low=1.0, high=8.0, period=5.0, duration=2000.0)
    per_period = [sum(p * 5.0 <= t < (p + 1) * 5.0 for t in times) / 5.0 for p in range(400)]
    assert statistics.fmean(per_period) == pytest.approx(4.5, rel=0.08)  # the mean of U(1, 8)
    assert statistics.pstdev(per_period) > 1.5  # rates really change (a fixed rate of 4.5 gives about 0.95)
    with pytest.raises(WorkloadError):
        workload.rate_step_arrivals(random.Random(0), 8.0, 1.0, 5.0, 10.0)


def test_trace_replay_keeps_the_trace_gaps_scaled(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.5000000,100,10\n"
                        "2023-11-16 18:17:04.0000000,200,20\n2023-11-16 18:17:06.0000000,300,30\n")
    trace = workload.load_trace(csv_path)
    assert trace.times == pytest.approx([0.0, 0.5, 2.5]) and trace.input_lens == [100, 200, 300]
    assert workload.trace_arrivals(trace, duration=5.1, time_scale=2.0) == [0, 1, 2]
    assert workload.trace_arrivals(trace, duration=4.9, time_scale=2.0) == [0, 1]  # 2.5 s x 2 = 5 s
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"timestamp": 1000, "input_length": 5, "output_length": 6}\n'
                     '{"timestamp": 3500, "input_length": 7, "output_length": 8}\n')
    assert workload.load_trace(jsonl).times == [0.0, 2.5]  # milliseconds
    with pytest.raises(WorkloadError, match="cannot read"):
        workload.load_trace(tmp_path / "missing.csv")


needs_shared_data = pytest.mark.skipif(not workload.DATA_DIR.is_dir(),
                                       reason=f"no shared workload data at {workload.DATA_DIR} (OMNISERVE_DATA_DIR)")


@needs_shared_data
def test_real_traces_replay_at_their_own_rate():
    """The Azure code trace: 8,819 requests over 57 minutes (2.6/s) and very bursty."""
    trace = workload.load_trace("azure-code")
    assert len(trace.times) == 8819
    first_10_min = workload.trace_arrivals(trace, duration=600.0)
    scaled = workload.trace_arrivals(trace, duration=600.0, time_scale=10.0)
    assert 1.5 < len(first_10_min) / 600.0 < 4.0 and len(scaled) < len(first_10_min) / 5
    assert cv(gaps([trace.times[i] for i in first_10_min])) > 1.5  # burstier than Poisson
    assert len(workload.load_trace("mooncake").times) == 12031


class FakeTokenizer:
    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return 50

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + len(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join("x" * (i - 3) for i in ids)


@needs_shared_data
def test_streams_take_lengths_from_the_dataset_or_the_trace():
    maker = workload.PromptMaker(FakeTokenizer(), random.Random(0))
    spec = StreamSpec(rate=2.0, dataset="random", input_len="10:20", output_len="5")
    requests = workload.build_stream(spec, 50.0, maker, random.Random(0))
    assert requests and all(10 <= r.input_len <= 20 for r in requests)
    assert all(len(r.prompt) == r.input_len and r.output_len == 5 and min(r.prompt) > 2 for r in requests)
    traced = workload.build_stream(StreamSpec(trace="azure-code", max_input_len=64, max_output_len=8), 60.0, maker,
                                   random.Random(0))
    trace = workload.load_trace("azure-code")
    assert [r.input_len for r in traced[:5]] == [min(n, 64) for n in trace.input_lens[:5]]
    assert all(r.output_len <= 8 for r in traced)
    shared = workload.build_stream(StreamSpec(rate=1.0, max_input_len=30), 20.0, maker, random.Random(0))
    assert all(isinstance(r.prompt, str) and r.input_len <= 30 for r in shared)
    assert workload.build_stream(StreamSpec(), 10.0, maker, random.Random(0)) == []


# -------------------------------------------------------------------------------------------------------- metrics
def record(service_class, arrival, first=None, end=None, tokens=0, status="ok", chunks=None) -> Record:
    times = chunks if chunks is not None else ([] if first is None else
                                               [first + (end - first) * i / max(1, tokens - 1) for i in range(tokens)])
    return Record(service_class, arrival, 10, tokens, status=status, token_times=times, output_tokens=tokens,
                  end=end, sent=arrival)


def test_metrics_of_hand_made_records():
    slo = Slo(ttft=1.0, tpot=0.1)
    records = [
        record("ls", 0.0, first=0.5, end=1.4, tokens=10),  # ttft 0.5, tpot 0.1: meets both
        record("ls", 1.0, first=2.5, end=3.4, tokens=10),  # ttft 1.5: misses
        record("ls", 2.0, first=2.2, end=4.2, tokens=11),  # tpot 0.2: misses
        record("ls", 3.0, first=3.1, end=3.1, tokens=1),  # one token: no TPOT, meets
        record("ls", 4.0, status="rejected"),
        record("be", 0.0, first=1.0, end=9.0, tokens=5),
        record("be", 5.0, first=9.5, end=12.0, tokens=4, status="cancelled"),
        record("be", 6.0, status="failed"),
    ]
    summary = metrics.summarize(records, duration=10.0, run_seconds=12.0, slos={"ls": slo})
    ls, be = summary["ls"], summary["be"]
    assert list(summary) == ["ls", "be"]
    assert (ls["requests"], ls["ok"], ls["rejected"], ls["failed"]) == (5, 4, 1, 0)
    assert ls["ttft"]["count"] == 4 and ls["ttft"]["median"] == pytest.approx(0.35)
    assert ls["tpot"]["count"] == 3 and ls["tpot"]["mean"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert ls["slo_attainment"] == pytest.approx(2 / 5) and ls["goodput"] == pytest.approx(0.2)
    assert ls["ttft_attainment"] == pytest.approx(3 / 5)
    assert ls["itl"]["count"] == 9 + 9 + 10
    assert (be["ok"], be["cancelled"], be["failed"]) == (1, 1, 1) and "slo_attainment" not in be
    # BE tokens in [0, 10): the five of the finished request, one of the cancelled one (9.5 s) as one token each.
    assert be["output_throughput"] == pytest.approx(6 / 10.0)
    line = metrics.timeline(records, 12.0, bin_s=2.0)
    assert line["ls_arrivals"][:3] == [2, 2, 1] and line["ls_tpot"][0] == pytest.approx(0.1)
    assert sum(line["be_tokens_per_s"]) * 2.0 == pytest.approx(5 + 4)


def test_usage_spreads_tokens_over_chunks_that_carry_several():
    many = record("be", 0.0, end=2.0, tokens=6, chunks=[0.5, 1.0, 1.5])  # three chunks of two tokens
    assert metrics.summarize([many], 1.2, 2.0, {})["be"]["output_throughput"] == pytest.approx(4 / 1.2)


# ------------------------------------------------------------------------------- the server's offloaded tokens
@pytest.mark.parametrize("buckets, expected", [
    ({1.0: 2, 2.0: 6, 4.0: 10, float("inf"): 10}, 1.75),  # rank 5: 3 of the 4 in (1, 2]
    ({1.0: 10, float("inf"): 10}, 0.5),  # the first bucket starts at 0
    ({1.0: 1, 2.0: 2, float("inf"): 10}, 2.0),  # the rank is past every finite bound: the highest of them
    ({1.0: 0, 2.0: 0, float("inf"): 0}, None),
    ({}, None),
])
def test_median_from_cumulative_buckets_as_histogram_quantile(buckets, expected):
    assert server_metrics.bucket_quantile(0.5, buckets) == expected


def test_the_runs_share_is_the_difference_of_two_scrapes():
    served = ServerMetrics("tiny")
    served.offloaded_iterations.labels("tiny", "be").observe(100)  # before the run: must not count
    before = server_metrics.parse(served.render()[0].decode())
    for iterations, seconds, layers in [(2, 0.01, 1.0), (3, 0.03, 0.75), (3, 0.05, 0.5), (5, 0.1, 0.5)]:
        served.offloaded_iterations.labels("tiny", "be").observe(iterations)
        served.offloaded_seconds.labels("tiny", "be").observe(seconds)
        served.offloaded_layers.labels("tiny", "be").observe(layers)
    be = server_metrics.offloaded_tokens(before, server_metrics.parse(served.render()[0].decode()))["be"]
    assert be["count"] == 4 and be["iterations"]["mean"] == pytest.approx(13 / 4)
    assert be["iterations"]["p50"] == pytest.approx(2.5)  # rank 2: 1 below 2, then halfway through the 2 in (2, 3]
    assert be["seconds"]["mean"] == pytest.approx(0.0475) and be["layers_per_iteration"]["p50"] == pytest.approx(0.5)
    assert server_metrics.offloaded_tokens(None, before) == {}


def stand_in_server(with_metrics: bool) -> FastAPI:
    """A server that answers completions well and whose /metrics (if any) has none of the offloaded-token
    histograms."""
    app = FastAPI()
    good = 'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n'

    @app.post("/v1/completions")
    async def completions():
        async def body():
            yield good
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    if with_metrics:
        @app.get("/metrics")
        async def scrape():
            return PlainTextResponse("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n")

    return app


@pytest.mark.parametrize("with_metrics", [True, False], ids=["other-metrics", "no-metrics-endpoint"])
def test_a_server_without_offloaded_token_histograms_runs_with_one_warning(with_metrics, caplog):
    server = RunningServer(stand_in_server(with_metrics))
    config = runner.BenchConfig(base_url=server.url, model="m", streams={"be": StreamSpec(rate=1.0)}, duration=0.3)
    try:
        result, records = runner.run(config, {"be": [Request(0.0, [5, 6], 2, 1), Request(0.1, [7], 1, 1)]},
                                     progress=False)
    finally:
        server.stop()
    assert [r.status for r in records] == ["ok", "ok"] and result["offloaded_tokens"] == {}
    warnings = [r for r in caplog.records if r.name == server_metrics.__name__]
    assert len(warnings) == 1 and "offloaded" in warnings[0].getMessage()
    assert "offloaded" not in runner.report(result)


def test_a_run_reports_the_tokens_the_server_offloaded(tiny_chat_model):
    requests = [Request(0.0, [30, 31, 32], 3, 6), Request(0.2, [40, 41], 2, 6)]
    with serving(tiny_chat_model, be_decode_placement="cpu") as server:
        config = runner.BenchConfig(base_url=server.url, model="tiny", streams={"be": StreamSpec(rate=1.0)},
                                    duration=0.3)
        result, records = runner.run(config, {"be": requests}, progress=False)
        layers = server.engine.scheduler.state.num_layers
        server.wait_idle()
    assert all(r.status == "ok" for r in records)
    be = result["offloaded_tokens"]["be"]
    # Every token after the prefill's is offloaded; the last may be timed just after the run's final scrape.
    assert 2 * 5 - 1 <= be["count"] <= 2 * 5
    assert be["iterations"]["mean"] >= 1 and 0 < be["layers_per_iteration"]["mean"] <= layers
    assert be["seconds"]["p50"] > 0 and "offloaded tokens" in runner.report(result)


# ------------------------------------------------------------------------------------------- against the server
def bench_args(url: str, tokenizer: str, out, *extra: str) -> list[str]:
    return ["bench", "--base-url", url, "--tokenizer", tokenizer, "--duration", "2", "--seed", "3",
            "--ls-rate", "4", "--ls-dataset", "random", "--ls-input-len", "8:24", "--ls-output-len", "6",
            "--be-rate", "3", "--be-dataset", "random", "--be-input-len", "40", "--be-output-len", "12",
            "--no-progress", "--output-dir", str(out), *extra]


def run_cli(argv: list[str], capsys) -> dict:
    main(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_end_to_end_both_classes_complete_and_outputs_are_written(tiny_chat_model, tmp_path, capsys):
    with serving(tiny_chat_model) as server:
        result = run_cli(bench_args(server.url, tiny_chat_model, tmp_path, "--ttft-slo", "30", "--tpot-slo", "5"),
                         capsys)
        server.wait_idle()
    ls, be = result["summary"]["ls"], result["summary"]["be"]
    assert ls["requests"] > 0 and be["requests"] > 0
    assert ls["ok"] == ls["requests"] and be["ok"] == be["requests"], (ls["errors"], be["errors"])
    assert ls["output_tokens"] == 6 * ls["ok"] and be["output_tokens"] == 12 * be["ok"]
    assert ls["slo_attainment"] == 1.0 and ls["ttft"]["p99"] < 30
    saved = json.loads((tmp_path / "result.json").read_text())
    assert len(saved["records"]) == ls["requests"] + be["requests"]
    for name in ("latency_cdf.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_endpoint_streams_text_prompts_and_token_prompts(tiny_chat_model):
    from omniserve.models.loader import resolve_model
    from omniserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(*resolve_model(tiny_chat_model, "auto"))
    requests = [Request(0.0, "the capital of france is", 6, 5), Request(0.1, [30, 31, 32], 3, 4)]
    with serving(tiny_chat_model) as server:
        records, _ = asyncio.run(run_streams([Stream("ls", Target(server.url, "tiny", "chat"), requests)],
                                             duration=0.2, drain_timeout=30.0, request_timeout=30.0,
                                             tokenizer=tokenizer))
        server.wait_idle()
    assert [(r.status, r.output_tokens) for r in records] == [("ok", 5), ("ok", 4)], [r.error for r in records]
    assert all(r.token_times and r.ttft > 0 for r in records)


def test_rejected_ls_requests_are_counted_apart_from_failures(slo_server, tiny_chat_model, tmp_path,
                                                             capsys):
    """slo_server rejects every LS request at admission (429); BE requests run."""
    result = run_cli(bench_args(slo_server.url, tiny_chat_model, tmp_path, "--ttft-slo", "0.5"), capsys)
    ls, be = result["summary"]["ls"], result["summary"]["be"]
    assert ls["rejected"] == ls["requests"] > 0 and ls["failed"] == 0 and ls["slo_attainment"] == 0.0
    assert be["ok"] == be["requests"] > 0
    slo_server.wait_idle()


def test_compare_starts_a_server_per_policy_and_tabulates(tiny_chat_model, tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(MODEL.to_json())
    server_args = f"--model {tiny_chat_model} --block-size 4 --profile-path {profile} --max-num-seqs 8"
    argv = bench_args("unused", tiny_chat_model, tmp_path / "cmp", "--ttft-slo", "30", "--tpot-slo", "5",
                      "--compare", "--policies", "omniserve,fcfs", "--server-args", server_args)
    argv[argv.index("--duration") + 1] = "1.5"
    main(argv)
    out = capsys.readouterr()
    results = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert [r["policy"] for r in results] == ["omniserve", "fcfs"]
    for r in results:
        assert r["summary"]["ls"]["ok"] == r["summary"]["ls"]["requests"] > 0
        assert r["summary"]["be"]["ok"] == r["summary"]["be"]["requests"] > 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| omniserve |" in table and "| fcfs |" in table and "omniserve vs" in table
    assert (tmp_path / "cmp" / "fcfs" / "timeline.png").exists()
    assert (tmp_path / "cmp" / "omniserve" / "server.log").exists()


def test_a_server_that_does_not_start_is_reported(tmp_path):
    with pytest.raises(compare.ServerError, match="exited"):
        compare.Server("omniserve", Slo(), ["--model", str(tmp_path / "nothing-here")], tmp_path / "log", 60)


# ------------------------------------------------------------------------------------ the BE stream as a batch
def test_batch_lines_carry_the_http_bodies_unstreamed():
    target = Target("http://x", "m", "chat", "flex", extra_body={"priority": 1})
    requests = [Request(0.0, "hello world", 2, 5), Request(3.0, [30, 31], 2, 7)]
    lines = [json.loads(line) for line in batch.batch_file(target, requests, FakeTokenizer()).splitlines()]
    assert [line["custom_id"] for line in lines] == ["be-0", "be-1"]
    assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines)
    for line, request in zip(lines, requests):
        streamed = request_body(target, request, FakeTokenizer())
        assert streamed.pop("stream") is True and "stream_options" in streamed
        del streamed["stream_options"]
        assert line["body"] == streamed  # the same request, whole answer instead of a stream
    assert lines[1]["body"]["max_tokens"] == 7 and lines[1]["body"]["priority"] == 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_be_batch_run_answers_every_line_beside_ls(tiny_chat_model, tmp_path, capsys, endpoint):
    with serving(tiny_chat_model) as server:
        main(bench_args(server.url, tiny_chat_model, tmp_path, "--ttft-slo", "30", "--tpot-slo", "5",
                        "--be-batch", "--endpoint", endpoint))
        server.wait_idle()
    out = capsys.readouterr()
    result = json.loads(next(line for line in out.out.splitlines() if line.startswith("{")))
    ls, be = result["summary"]["ls"], result["summary"]["be"]
    assert ls["ok"] == ls["requests"] > 0 and ls["slo_attainment"] == 1.0, ls["errors"]
    assert be["mode"] == "batch" and be["status"] == "completed" and be["batch_id"].startswith("batch_")
    assert be["lines"] > 0 and be["completed"] == be["lines"] and be["failed"] == be["not_run"] == 0, be["errors"]
    assert be["output_tokens"] == 12 * be["lines"]  # every line's usage, from the output file
    assert be["wall_seconds"] > 0 and be["lines_per_second"] == pytest.approx(be["lines"] / be["wall_seconds"])
    assert be["output_throughput"] == pytest.approx(be["output_tokens"] / be["wall_seconds"])
    assert result["be_batch"] and "lines/s" in out.err and f"{be['lines']} completed" in out.err
    saved = json.loads((tmp_path / "result.json").read_text())
    assert {r["service_class"] for r in saved["records"]} == {"ls"}  # the lines are the batch's, not HTTP records


def test_batch_answers_are_the_http_answers(tiny_chat_model):
    requests = [Request(0.0, [30 + i, 31, 32, 33], 4, 5 + i) for i in range(4)]
    with serving(tiny_chat_model) as server:
        target = Target(server.url, "tiny", service_tier="flex")
        records, _ = asyncio.run(run_streams([Stream("be", target, requests)], duration=0.1, drain_timeout=60.0,
                                             request_timeout=60.0, keep_text=True))
        _, _, outcome = asyncio.run(batch.run_beside([], batch.BatchJob(target, requests), 0.1, 60.0, 60.0))
        server.wait_idle()
    assert outcome.status == "completed" and [r.status for r in records] == ["ok"] * 4
    for n, record in enumerate(records):
        line = outcome.lines[batch.custom_id(n)]
        assert line.status == "completed" and line.output_tokens == record.output_tokens == 5 + n
        assert line.text and line.text == record.text  # greedy: the same tokens either way


def test_a_batch_still_running_at_the_deadline_is_cancelled(tiny_chat_model):
    """Each step lasts 0.5 s, so no 12-token line can end before the deadline (0.5 s after the start)."""
    requests = [Request(0.0, [30, 31, 32], 3, 12) for _ in range(3)]
    config = runner.BenchConfig(model="tiny", streams={"be": StreamSpec(rate=1.0)}, duration=0.2,
                                drain_timeout=0.3, be_batch=True)
    with serving(tiny_chat_model) as server, slow_engine(server, 0.5):
        result, records = runner.run(replace(config, base_url=server.url), {"be": requests}, progress=False)
        server.wait_idle(30)
    be = result["summary"]["be"]
    assert records == [] and be["status"] == "cancelled" and be["lines"] == 3
    assert be["not_run"] == 3 and be["completed"] == be["failed"] == 0
    assert result["run_seconds"] >= 0.5 and 0 < be["wall_seconds"] <= result["run_seconds"]  # waited for the deadline
    assert be["lines_per_second"] == 0.0


class FinishingBatches:
    """The Batches calls of a batch still finalizing at the deadline: the cancel is refused (409), then it completes
    with one of its two lines answered."""

    def __init__(self) -> None:
        self.cancel_tried = False

    async def create(self, file_id: str, endpoint: str) -> dict:
        return {"id": "batch_1", "status": "in_progress"}

    async def retrieve(self, batch_id: str) -> dict:
        if not self.cancel_tried:
            return {"id": batch_id, "status": "finalizing"}
        return {"id": batch_id, "status": "completed", "output_file_id": "file-out", "error_file_id": None}

    async def cancel(self, batch_id: str) -> dict:
        self.cancel_tried = True
        raise batch.BatchError(f"POST /v1/batches/{batch_id}/cancel: HTTP 409: cannot cancel a batch that is finishing")

    async def content(self, file_id: str) -> bytes:
        body = {"choices": [{"index": 0, "text": "hi"}], "usage": {"completion_tokens": 3}}
        return json.dumps({"custom_id": "be-0", "response": {"status_code": 200, "body": body}}).encode() + b"\n"


def test_a_batch_finishing_at_the_deadline_keeps_its_answers():
    ticks = iter(range(1000))
    clock = lambda: next(ticks) * 0.01  # noqa: E731 (each look at the clock moves it on)
    job = batch.BatchJob(Target("http://unused", "m"), [Request(0.0, [5], 1, 3), Request(0.0, [6], 1, 3)], poll_s=0.0)
    batches = FinishingBatches()
    outcome = asyncio.run(batch.run_batch(batches, "file-in", job, deadline=0.05, clock=clock))
    assert batches.cancel_tried and outcome.status == "completed" and not outcome.error
    assert outcome.lines["be-0"] == batch.LineOutcome("completed", 3, "hi")
    summary = outcome.summary()
    assert (summary["completed"], summary["not_run"], summary["output_tokens"]) == (1, 1, 3)


def test_a_closed_loop_cannot_be_a_batch():
    config = runner.BenchConfig(model="m", streams={"be": StreamSpec(concurrency=2)}, be_batch=True)
    with pytest.raises(WorkloadError, match="closed loop"):
        runner.run(config, {"be": [Request(None, [1], 1, 1)]}, progress=False)


@pytest.mark.parametrize("be_args, message", [([], "give it one"), (["--be-concurrency", "2"], "closed loop")])
def test_be_batch_flag_errors_come_before_any_server_is_called(be_args, message):
    with pytest.raises(SystemExit, match=message):  # port 9: nothing listens, and nothing is asked
        main(["bench", "--base-url", "http://127.0.0.1:9", "--ls-rate", "1", "--be-batch", *be_args])


def test_a_server_without_the_batch_api_leaves_the_batch_not_created_and_runs_ls():
    server = RunningServer(stand_in_server(True))  # completions, no /v1/files
    config = runner.BenchConfig(base_url=server.url, model="m", streams={"ls": StreamSpec(rate=1.0),
                                                                         "be": StreamSpec(rate=1.0)},
                                duration=0.3, be_batch=True)
    try:
        result, records = runner.run(config, {"ls": [Request(0.0, [5, 6], 2, 1)], "be": [Request(0.0, [7], 1, 1)]},
                                     progress=False)
    finally:
        server.stop()
    be = result["summary"]["be"]
    assert [r.status for r in records] == ["ok"] and be["status"] == "not_created" and be["not_run"] == 1
    assert any("upload: POST /v1/files: HTTP 404" in error for error in be["errors"])


def test_failed_lines_are_read_from_the_error_file():
    outcome = batch.BatchOutcome.pending(3)
    answer = {"choices": [{"index": 0, "text": "hi"}], "usage": {"completion_tokens": 2}}
    output = json.dumps({"custom_id": "be-0", "response": {"status_code": 200, "body": answer}}).encode()
    errors = b"\n".join(json.dumps(line).encode() for line in (
        {"custom_id": "be-1", "response": {"status_code": 400, "body": {"error": {"message": "too long"}}}},
        {"custom_id": "be-2", "response": None, "error": {"code": "batch_expired", "message": "window ended"}}))
    batch.read_results(outcome, output, errors)
    assert outcome.lines["be-0"] == batch.LineOutcome("completed", 2, "hi")
    assert outcome.lines["be-1"] == batch.LineOutcome("failed", error="HTTP 400: too long")
    assert outcome.lines["be-2"] == batch.LineOutcome("failed", error="window ended")
    summary = outcome.summary()
    assert (summary["completed"], summary["failed"], summary["not_run"]) == (1, 2, 0)


# ------------------------------------------------------------------------------------------- a broken server
def broken_app() -> FastAPI:
    """Answers in turn: a 500, a stream cut before [DONE], a chunk that is not JSON, an error chunk, a stream
    that goes silent, a 503 before streaming, and a good stream (so a run mixes them)."""
    app = FastAPI()
    count = {"n": 0}
    good = 'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n'

    async def cut():
        yield good
        raise RuntimeError("the server dies mid-stream")

    async def silent():
        yield good
        await asyncio.sleep(60)

    async def stream(*chunks):
        for chunk in chunks:
            yield chunk

    @app.post("/v1/completions")
    async def completions():
        count["n"] += 1
        kind = count["n"] % 7
        if kind == 1:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if kind == 6:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        body = {2: cut(), 3: stream(good, "data: {not json\n\n"),
                4: stream(good, 'data: {"error": {"message": "engine died"}}\n\n'),
                5: silent(), 0: stream(good, good, 'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n',
                                       "data: [DONE]\n\n")}[kind]
        return StreamingResponse(body, media_type="text/event-stream")

    return app


def test_a_broken_server_gives_counted_failures_not_a_hang():
    server = RunningServer(broken_app())
    try:
        requests = [Request(0.05 * i, [5, 6, 7], 3, 2) for i in range(14)]
        started = time.monotonic()
        records, _ = asyncio.run(run_streams([Stream("ls", Target(server.url, "m"), requests)], duration=1.0,
                                             drain_timeout=10.0, request_timeout=1.0))
        assert time.monotonic() - started < 8  # the silent streams fail at the request timeout
    finally:
        server.stop()
    by_status = {s: [r for r in records if r.status == s] for s in metrics.STATUSES}
    assert len(by_status["ok"]) == 2 and all(r.output_tokens == 2 for r in by_status["ok"])
    assert len(by_status["failed"]) == 12
    errors = " | ".join(r.error for r in by_status["failed"])
    for expected in ("HTTP 500: boom", "HTTP 503: overloaded", "malformed chunk", "error chunk", "ReadTimeout"):
        assert expected in errors
    # A stream cut mid-body shows as one of these, by how the closed connection reaches the client (a reset: ReadError).
    assert any(cut in errors for cut in ("before [DONE]", "RemoteProtocolError", "ReadError"))
    summary = metrics.summarize(records, 1.0, 2.0, {"ls": Slo(ttft=1.0)})["ls"]
    assert summary["failed"] == 12 and summary["slo_attainment"] == pytest.approx(2 / 14)


def test_requests_still_open_at_the_end_are_cancelled_and_counted():
    server = RunningServer(broken_app())
    try:
        requests = [Request(0.0, [1], 1, 2) for _ in range(5)]  # the fifth is the silent one
        records, seconds = asyncio.run(run_streams([Stream("be", Target(server.url, "m"), requests)], duration=0.2,
                                                   drain_timeout=0.5, request_timeout=30.0))
    finally:
        server.stop()
    assert seconds < 5 and [r.status for r in records].count("cancelled") == 1


@pytest.mark.parametrize("flags, message", [
    (["--ls-rate-steps", "1:8"], "LOW:HIGH:PERIOD"),
    (["--ls-rate-steps", "8:1:5"], "0 < low <= high"),
    (["--be-extra-body", "{not json"], "not JSON"),
    (["--be-extra-body", "[1]"], "JSON object"),
    (["--ls-input-len", "0"], "0 < LOW <= HIGH"),
    (["--compare", "--policies", "omniserve,best"], "unknown policies"),
])
def test_bad_flags_are_clear_errors_before_anything_runs(tiny_chat_model, flags, message):
    argv = ["bench", "--base-url", "http://127.0.0.1:9", "--tokenizer", tiny_chat_model, "--ls-rate", "1",
            "--ls-dataset", "random", "--no-progress", *flags]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert message in str(info.value)


def test_slos_from_the_profile_follow_the_latency_model(tiny_chat_model, tmp_path):
    from omniserve.engine.scheduler.latency_model import BatchShape

    profile = tmp_path / "profile.json"
    profile.write_text(MODEL.to_json())
    args = ["--model", tiny_chat_model, "--profile-path", str(profile)]
    lone_decode = MODEL.iteration_time(BatchShape(num_rows=1, decode_context=101, num_decodes=1, num_sampled=1))
    one_chunk = MODEL.iteration_time(BatchShape(101, prefill_interactions(0, 100), 101, 1, 2, (), 100))
    loose = slos.slos_from_profile(args, max_prompt=100, tpot_factor=100.0, ttft_factor=2.0)
    assert loose.tpot == pytest.approx(100.0 * lone_decode)
    assert loose.ttft == pytest.approx(2.0 * one_chunk)  # a TPOT budget this loose holds the prompt in one chunk
    tight = slos.slos_from_profile(args, max_prompt=100, tpot_factor=3.0, ttft_factor=2.0)
    assert tight.tpot == pytest.approx(3.0 * lone_decode)
    assert tight.ttft > loose.ttft  # chunks that fit the budget repeat the decode's and the head's cost


def test_budgeted_prefill_shrinks_each_chunk_until_it_fits():
    def seconds(start, count):  # a second per token, wherever the chunk starts
        return float(count)

    assert slos.budgeted_prefill(seconds, 25, 16, 10.0) == [(9, 9.0), (9, 9.0), (7, 7.0)]  # 16 -> 12 -> 9
    assert slos.budgeted_prefill(seconds, 25, 16, 10.0, shrink=lambda n: n - 1) == [(10, 10.0), (10, 10.0), (5, 5.0)]
    assert slos.budgeted_prefill(seconds, 3, 16, 0.5) == [(1, 1.0)] * 3  # a single token goes whatever it costs


@pytest.mark.parametrize("policy", ["omniserve", "sarathi"])
def test_slos_look_up_the_profile_an_engine_of_the_server_args_would(tiny_chat_model, policy, monkeypatch):
    """The cache key must match what the servers look up, or each would profile again at start-up."""
    import torch

    from omniserve.engine.llm_engine import LLMEngine
    from omniserve.profiler import profiler

    lookups = []

    def fake_load_or_profile(model, device, dtype, **settings):
        lookups.append((device, dtype, torch.get_num_threads(), settings))
        return MODEL

    monkeypatch.setattr(profiler, "load_or_profile", fake_load_or_profile)
    threads = torch.get_num_threads()
    server_args = ["--model", tiny_chat_model, "--policy", policy, "--max-model-len", "96", "--block-size", "4",
                   "--max-num-batched-tokens", "32", "--threads", "1", "--cpu-attention-threads", "2", "--port", "0"]
    try:
        slos.slos_from_profile(server_args, max_prompt=50, tpot_factor=3.0, ttft_factor=2.0)
        engine_args = replace(slos.server_engine_args(server_args), ls_ttft_slo=5.0, ls_tpot_slo=1.0)
        LLMEngine(engine_args, latency_model=profiler.profiled_latency_model).shutdown()
    finally:
        torch.set_num_threads(threads)
    assert len(lookups) == 2 and lookups[0] == lookups[1]
    assert (lookups[0][3]["pool_config"] is None) == (policy == "sarathi")


def test_closed_loop_keeps_n_in_flight_and_cycles_its_pool(tiny_chat_model):
    pool = [Request(None, [30 + i, 31, 32], 3, 4) for i in range(3)]
    with serving(tiny_chat_model) as server:
        records, _ = asyncio.run(run_streams([Stream("ls", Target(server.url, "tiny"), pool, concurrency=2)],
                                             duration=1.5, drain_timeout=30.0, request_timeout=30.0))
        server.wait_idle()
    assert len(records) > len(pool) and all(r.status == "ok" and r.output_tokens == 4 for r in records)
    events = sorted([(r.sent, 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1]))
    in_flight = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(in_flight) == 2
