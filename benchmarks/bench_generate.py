"""Offline generation benchmark of omniserve on the built-in SmolLM2-135M-Instruct (fp32), against limits measured
in the same run.

1. Throughput: output tokens/s of `LLM.generate` at each concurrency (all requests submitted at once, prompts of
   exactly --prompt-len token ids cut from ShareGPT, exactly --output-len greedy tokens each, EOS ignored), against
   transformers' batched `model.generate` on the same prompts and weights (same GGUF file, fp32, same threads).
2. Decode step time: wall time of the engine iterations (`engine.step()`: schedule + forward + sample + detokenise)
   in which every request decodes one token, taken from the same runs, against the floor of reading every weight
   once per step: weight bytes (tied embedding counted once) / read bandwidth, measured here by summing a large
   fp32 tensor with torch at the engine's thread count. KV-cache reads (which grow with batch and context) are
   not part of the floor, so it is tightest at batch 1.

Fixed seeds, a warm-up run per configuration, then --repeats runs with omniserve and transformers interleaved;
figures are medians with the min-max spread in brackets.

    python benchmarks/bench_generate.py --concurrency 1 8 32 --repeats 3 --markdown bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omniserve import LLM, SamplingParams
from omniserve.bench.machine import OtherLoad, read_bandwidth
from omniserve.bench.report import command_line, cpu_model, print_report, spread, write_markdown
from omniserve.bench.workload import load_prompts
from omniserve.engine.observer import IterationRecord
from omniserve.models.linear import linear
from omniserve.models.loader import default_model_path

TENTHS = "{:.1f}"  # throughput and milliseconds are shown to a tenth


@torch.inference_mode()
def gemv_ms(model: torch.nn.Module, repeats: int) -> list[float]:
    """ms to multiply one row by every weight matrix (the embedding as the LM head) with the engine's GEMM: a batch-1
    step's GEMVs alone."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for w in weights:
            linear(torch.ones(1, w.shape[1]), w)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return times


class StepRecorder:
    """Every engine step that ran device chunks, from the engine's iteration records: its time and what it ran."""

    def __init__(self, engine) -> None:
        self.steps: list[tuple[float, int, bool]] = []  # (seconds, requests in the batch, every request decoding)
        engine.add_iteration_observer(self.note)

    def note(self, record: IterationRecord) -> None:
        if record.plan.chunks:
            self.steps.append((record.step_seconds, record.num_chunks, record.num_rows == record.num_chunks))

    def decode_times(self, batch: int) -> list[float]:
        return [t for t, size, decode in self.steps if decode and size == batch]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup-len", type=int, default=16, help="output tokens of the warm-up runs")
    parser.add_argument("--threads", type=int, default=None, help="engine CPU threads (default: torch's choice)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test tensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:  # no transformers baseline: loading it alone takes longer than the whole run
        args.concurrency, args.repeats, args.prompt_len, args.output_len = [1, 2], 1, 8, 4
        args.warmup_len, args.bandwidth_gib, args.skip_hf = 2, 0.01, True
    return args


def load_hf_model():
    """transformers' model of the same GGUF file, fp32."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def run_omni(llm: LLM, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]


@torch.inference_mode()
def run_hf(hf, pad_token_id: int, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(batch)  # every prompt has the same length: left padding is a no-op, the mask all ones
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, pad_token_id=pad_token_id,
    )
    return out[:, ids.shape[1]:].tolist()


@dataclass
class Figures:
    """One concurrency's runs: tokens/s of each side and the median decode step per repeat, and the share of
    requests whose output equals transformers' (last repeat)."""

    concurrency: int
    omni_tps: list[float]
    hf_tps: list[float]
    steps_ms: list[float]
    same: float


def measure(args: argparse.Namespace, llm: LLM, hf, recorder: StepRecorder, batch: list[list[int]]) -> Figures:
    """A warm-up of each side, then --repeats runs of omniserve and transformers, interleaved."""
    conc, pad = len(batch), (llm.engine.runner.model.config.eos_token_ids or (0,))[0]
    run_omni(llm, batch, args.warmup_len)
    if hf is not None:
        run_hf(hf, pad, batch, args.warmup_len)
    figures = Figures(conc, [], [], [], 0.0)
    for _ in range(args.repeats):
        recorder.steps.clear()
        start = time.perf_counter()
        omni_out = run_omni(llm, batch, args.output_len)
        assert all(len(o) == args.output_len for o in omni_out), "omniserve returned a wrong number of tokens"
        figures.omni_tps.append(conc * args.output_len / (time.perf_counter() - start))
        figures.steps_ms.append(statistics.median(recorder.decode_times(conc) or [float("nan")]) * 1e3)
        if hf is not None:
            start = time.perf_counter()
            hf_out = run_hf(hf, pad, batch, args.output_len)
            assert all(len(o) == args.output_len for o in hf_out), "transformers returned a wrong number of tokens"
            figures.hf_tps.append(conc * args.output_len / (time.perf_counter() - start))
            figures.same = sum(a == b for a, b in zip(omni_out, hf_out)) / conc
    baseline = f", HF {spread(figures.hf_tps, TENTHS)} tok/s" if figures.hf_tps else ""
    print(f"concurrency {conc}: omniserve {spread(figures.omni_tps, TENTHS)} tok/s{baseline}, "
          f"decode step {spread(figures.steps_ms, TENTHS)} ms", file=sys.stderr, flush=True)
    return figures


COLUMNS = {"conc": "concurrency", "omni": "omniserve tok/s", "hf": "HF tok/s", "omni/hf": "omniserve/HF",
           "step": "decode step ms", "floor": "floor ms", "step/floor": "step/floor", "same": "same output as HF"}


def table_row(f: Figures, floor_ms: float, with_hf: bool) -> dict[str, str]:
    row = {"conc": f.concurrency, "omni": spread(f.omni_tps, TENTHS), "step": spread(f.steps_ms, TENTHS),
           "floor": f"{floor_ms:.1f}", "step/floor": f"{statistics.median(f.steps_ms) / floor_ms:.2f}x"}
    if with_hf:
        ratios = [o / h for o, h in zip(f.omni_tps, f.hf_tps)]
        row |= {"hf": spread(f.hf_tps, TENTHS), "omni/hf": spread(ratios) + "x", "same": f"{f.same:.0%}"}
    return row


def info_lines(args: argparse.Namespace, threads: int, with_hf: bool, interference: float, bandwidth: list[float],
               weight_bytes: int, floor_ms: float, gemv: list[float]) -> list[str]:
    hf_version = ""
    if with_hf:
        import transformers

        hf_version = f", transformers {transformers.__version__}"
    return [
        f"command: `{command_line()}`",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads, "
        f"python {platform.python_version()}{hf_version}; other processes used {interference:.0%} of the CPU during "
        "the runs",
        f"workload: {args.prompt_len}-token prompts, {args.output_len} greedy output tokens (EOS ignored), fp32, "
        f"{args.repeats} repeats after a {args.warmup_len}-token warm-up; median [min-max]",
        f"read bandwidth: {spread(bandwidth, TENTHS)} GB/s (sums of a {args.bandwidth_gib:g} GiB fp32 tensor before "
        f"and after the runs); weights {weight_bytes / 1e6:.1f} MB -> floor {floor_ms:.1f} ms per decode step",
        f"for reference, the engine's fp32 GEMVs over all weights (batch 1, nothing else): {spread(gemv, TENTHS)} ms "
        f"= {weight_bytes / statistics.median(gemv) / 1e6:.1f} GB/s",
    ]


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    llm = LLM(seed=args.seed, dtype="float32", device="cpu", threads=args.threads)
    threads = torch.get_num_threads()  # what the engine runs with; transformers and the bandwidth test share it
    model = llm.engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
    bandwidth = read_bandwidth(args.bandwidth_gib, repeats=max(5, args.repeats))  # again after the runs, for drift
    gemv = gemv_ms(model, repeats=max(5, args.repeats))
    prompts = load_prompts(llm.tokenizer, max(args.concurrency), args.prompt_len, model.config.vocab_size, args.seed)
    recorder = StepRecorder(llm.engine)
    hf = None if args.skip_hf else load_hf_model()
    others = OtherLoad()
    results = [measure(args, llm, hf, recorder, prompts[:conc]) for conc in args.concurrency]
    # Other work on these cores skews every figure (oversubscribed torch threads slow down many times over).
    interference = others.share()
    if interference > 0.05:
        print(f"warning: other processes used {interference:.0%} of the CPU during the runs", file=sys.stderr)
    bandwidth += read_bandwidth(args.bandwidth_gib, repeats=max(5, args.repeats))
    floor_ms = weight_bytes / (statistics.median(bandwidth) * 1e9) * 1e3
    rows = [table_row(f, floor_ms, hf is not None) for f in results]
    columns = {k: v for k, v in COLUMNS.items() if k in rows[0]}
    info = info_lines(args, threads, hf is not None, interference, bandwidth, weight_bytes, floor_ms, gemv)
    print_report(info, [(columns, rows)])
    write_markdown(args.markdown, "omniserve generation benchmark", info, [(columns, rows)])


if __name__ == "__main__":
    main()
