"""The serving benchmark (`omniserve bench`): LS and BE streams at once against any OpenAI-compatible server, with
per-class SLO metrics, plots, and a comparison of scheduling policies; and what the scripts in benchmarks/ share.

    workload.py        arrival processes, traces and prompt lengths (seeded); fixed-length ShareGPT prompts
    client.py          the asynchronous load generator
    batch.py           the BE stream as one OpenAI batch (--be-batch): its file, the batch, its polls and results
    metrics.py         each request's record; vLLM-style latency figures, SLO attainment, goodput, throughput, timeline
    plots.py           latency CDFs and the timeline, as PNG
    server_metrics.py  the server's offloaded-token histograms (/metrics), before and after a run
    runner.py          one run: workload -> records -> result (JSON) and outputs
    slos.py            LS SLOs from the latency profile the servers will use
    compare.py         one `omniserve serve` per policy, the same workload, one table
    cli.py             the command line
    engine_run.py      offline runs that step an LLMEngine directly: arrivals, step records, LS figures, counters
    machine.py         CPU accounting from /proc (others' load, waiting for quiet), read bandwidth
    report.py          figures over repeats, report tables (text, markdown), command/machine/revision lines
"""
