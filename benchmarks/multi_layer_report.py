"""The tables of bench_multi_layer.py: its figures per pipeline, multi-layer set against one-layer, the greedy tokens
compared, and the bookkeeping against its goal. `results` map each pipeline to its runs (bench_multi_layer.Result).
"""

from __future__ import annotations

import math

from omniserve.bench.report import spread


PIPELINES = ("one-layer", "multi-layer")  # the first is the baseline of the ratios
GOAL_TOKEN_SHARE = 0.25
GOAL_BOOKKEEPING_MS = 0.5


METRICS = [  # key, column, format, how multi-layer is compared with one-layer (None: not compared)
    ("tok50", "BE token p50 s", "{:.3f}", "ratio"),
    ("tok90", "BE token p90 s", "{:.3f}", "ratio"),
    ("iter", "step ms (offloaded rows)", "{:.1f}", "ratio"),
    ("goal", f"p50 token / (layers x step) (goal <= {GOAL_TOKEN_SHARE})", "{:.3f}", "ratio"),
    ("lpi", "layers/iteration mean", "{:.2f}", "ratio"),
    ("lpi50", "layers/iteration p50", "{:.2f}", "ratio"),
    ("ipt", "iterations/token p50", "{:.0f}", "ratio"),
    ("be_tps", "BE tok/s", "{:.1f}", "ratio"),
    ("prefill", "BE prefill phase s", "{:.1f}", "ratio"),
    ("be_tps_after", "BE tok/s after it", "{:.1f}", "ratio"),
    ("wait", "pool wait ms/step", "{:.2f}", "ratio"),
    ("wait_share", "pool wait / step", "{:.2f}", None),
    ("busy", "pool core busy", "{:.2f}", "ratio"),
]
LS_METRICS = [
    ("att", "LS SLO attainment", "{:.3f}", "points"),
    ("ls_n", "LS requests", "{:.0f}", None),
    ("rej", "LS rejected", "{:.0f}", None),
    ("ttft", "LS TTFT p90 / SLO", "{:.2f}", "ratio"),
    ("tpot", "LS mean TPOT p90 / SLO", "{:.2f}", "ratio"),
    ("ls_iters", "steps with LS rows", "{:.0f}", "ratio"),
    ("over", "of those planned over budget (goal 0)", "{:.0f}", None),
    ("over_slow", "of those measured > TPOT SLO", "{:.0f}", None),
    ("slow", "LS steps measured > TPOT SLO", "{:.0f}", None),
    ("idle", "idle-wait steps", "{:.0f}", None),
    ("steps", "steps", "{:.0f}", "ratio"),
    ("wall", "wall s", "{:.1f}", "ratio"),
    ("others_engine", "others on engine core", "{:.2f}", None),
    ("others_pool", "others on pool core", "{:.2f}", None),
]


def metric_rows(results: dict[str, list], metrics) -> list[dict[str, str]]:
    """Per pipeline the metrics (median [min-max] over repeats), then multi-layer against one-layer per repeat: a
    ratio, or a difference in points for shares."""
    rows = []
    for pipeline in PIPELINES:
        rows.append({"pipeline": pipeline} | {key: spread([r.figures[key] for r in results[pipeline]], fmt)
                                              for key, _, fmt, _ in metrics})
    base, new = results[PIPELINES[0]], results[PIPELINES[1]]
    compared = {"pipeline": "multi/one-layer"}
    for key, _, _, how in metrics:
        pairs = [(b.figures[key], n.figures[key]) for b, n in zip(base, new)]
        if how == "ratio":
            value = spread([n / b if b else math.nan for b, n in pairs], "{:.2f}")
            compared[key] = value if value == "-" else value + "x"
        elif how == "points":
            compared[key] = spread([100 * (n - b) for b, n in pairs], "{:+.1f}") + " pt"
        else:
            compared[key] = "-"
    return rows + [compared]


def token_pairs(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, int, int]:
    """(requests, identical requests, token positions, identical positions)."""
    return (len(a), sum(x == y for x, y in zip(a, b)), sum(len(x) for x in a),
            sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)))


def token_rows(results: dict[str, list], reference: list[list[int]]) -> list[dict[str, str]]:
    base, new = results[PIPELINES[0]], results[PIPELINES[1]]
    comparisons = [(f"{p} BE vs device reference", [token_pairs(r.be_tokens, reference) for r in results[p]])
                   for p in PIPELINES]
    comparisons.append(("multi-layer BE vs one-layer", [token_pairs(n.be_tokens, b.be_tokens)
                                                        for b, n in zip(base, new)]))
    ls = []
    for b, n in zip(base, new):
        common = sorted(set(b.ls_tokens) & set(n.ls_tokens))
        ls.append(token_pairs([n.ls_tokens[i] for i in common], [b.ls_tokens[i] for i in common]))
    comparisons.append(("multi-layer LS vs one-layer (same arrivals)", ls))
    rows = []
    for name, counts in comparisons:
        requests, same, positions, same_positions = (sum(c[i] for c in counts) for i in range(4))
        rows.append(dict(what=name, requests=str(requests), same=f"{same} ({same / max(requests, 1):.1%})",
                         positions=f"{same_positions / max(positions, 1):.2%}",
                         all="yes" if same == requests else "NO"))
    return rows


def bookkeeping_rows(sched: dict[str, dict[str, float]], runner: dict[str, float]) -> list[dict[str, str]]:
    rows = [dict(what=f"scheduler, {pipeline}: schedule() + update() + results_ready() (schedule() alone "
                      f"{f['schedule']:.3f} ms), {f['offloaded']} offloaded requests", ms=f"{f['total']:.3f}",
                 goal=f"{f['total'] / GOAL_BOOKKEEPING_MS:.2f}x") for pipeline, f in sched.items()]
    rows.append(dict(what=f"runner, multi-layer: _joining - its wait + _send + poll_cpu_results, less the pool's "
                          f"submit and poll ({runner['pool']:.3f} ms); {runner['offloaded']} offloaded requests, "
                          f"{runner['rows']:.0f} offloaded row-layers a step of {runner['step']:.1f} ms",
                     ms=f"{runner['total']:.3f}",
                     goal=f"{runner['total'] / GOAL_BOOKKEEPING_MS:.2f}x"))
    return rows


TOKEN_COLUMNS = {"what": "greedy tokens", "requests": "requests compared", "same": "identical requests",
                 "positions": "identical token positions", "all": "all identical"}
BOOK_COLUMNS = {"what": "bookkeeping per iteration (median)", "ms": "ms", "goal": f"/ {GOAL_BOOKKEEPING_MS} ms goal"}
