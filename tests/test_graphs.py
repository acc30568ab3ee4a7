"""The decode graphs' bookkeeping (engine/graphs.py) on the CPU: the static-buffer forward that a GPU captures, run
eagerly, in place of the engine's eager decode (--enforce-eager). Buckets, padding rows and the static inputs must
leave every token as the eager engine's, and padding rows must write no KV. Without padding, the same forward is the
CPU engine's decode path."""

from __future__ import annotations

import pytest
import torch

from omniserve.engine.graphs import DecodeGraphs, batch_buckets
from omniserve.sampling.params import SamplingParams

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29, [42, 43]]


def test_buckets_cover_every_batch_size_up_to_the_most_requests():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[-3:] == [240, 248, 256]


def _with_eager_graphs(llm) -> list[int]:
    """Puts an uncaptured DecodeGraphs into the engine's runner; returns the list of batch sizes it runs."""
    engine = llm.engine
    graphs = DecodeGraphs(engine.runner.model, engine.pool, engine.device, engine.scheduler_config.max_num_seqs,
                          engine.scheduler_config.max_model_len, capture=False)
    batches = []
    run = graphs.run
    graphs.run = lambda chunks: (batches.append(len(chunks)), run(chunks))[1]
    engine.runner.graphs = graphs
    return batches


@pytest.mark.parametrize("placement", ["device", "cpu"])
def test_tokens_equal_the_eager_engines(tiny_model_dirs, make_llm, placement):
    """Three to five rows in buckets of 4 and 8 (padding rows among them); with offloaded rows, the iterations that
    carry them run eagerly and the rest replay."""
    folder = tiny_model_dirs["llama"][0]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                             service_class="be" if i % 2 == 0 else "ls") for i in range(len(PROMPTS))]
    eager = make_llm(folder, dtype="float32", max_num_seqs=6, be_decode_placement=placement, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]
    replayed = make_llm(folder, dtype="float32", max_num_seqs=6, be_decode_placement=placement)
    batches = _with_eager_graphs(replayed)
    assert [o.outputs[0].token_ids for o in replayed.generate(PROMPTS, params, use_tqdm=False)] == expected
    assert batches and (placement == "cpu" or max(batches) == len(PROMPTS))

    cpu_path = make_llm(folder, dtype="float32", max_num_seqs=6, be_decode_placement=placement)
    assert cpu_path.engine.runner.graphs is not None and not cpu_path.engine.runner.graphs.pad
    assert [o.outputs[0].token_ids for o in cpu_path.generate(PROMPTS, params, use_tqdm=False)] == expected


@torch.inference_mode()
def test_padding_rows_write_no_kv(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float32", max_num_seqs=8)
    engine = llm.engine
    graphs = DecodeGraphs(engine.runner.model, engine.pool, engine.device, 8, 64, capture=False)
    from omniserve.bench.step_ops import decode_plan

    plan = decode_plan(3, 10, engine.pool.page_size)  # 3 rows in the bucket of 4
    before = [layer.clone() for layer in engine.pool.k]
    graphs.run(plan.chunks)
    for layer, old in zip(engine.pool.k, before):
        changed = (layer != old).any(dim=(1, 2)).nonzero().flatten().tolist()
        slots = [c.page_ids[10 // engine.pool.page_size] * engine.pool.page_size + 10 % engine.pool.page_size
                 for c in plan.chunks]
        assert set(changed) <= set(slots)


def _chunks(batch: dict[str, list[int]], page_size: int) -> list:
    from omniserve.engine.scheduler.plan import ScheduledChunk

    return [ScheduledChunk(request_id, [5], len(pages) * page_size - 1, list(pages), True, SamplingParams(), 1)
            for request_id, pages in batch.items()]


@pytest.mark.parametrize("pad", [True, False])
def test_page_tables_are_updated_in_place_and_stay_right(tiny_model_dirs, make_llm, pad):
    """Page tables are written incrementally (a request's new pages only, its row moved when rows shift): after
    every step, each row holds exactly its request's pages, however the batch changed."""
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float32", max_num_seqs=8)
    engine = llm.engine
    page_size = engine.pool.page_size
    graphs = DecodeGraphs(engine.runner.model, engine.pool, engine.device, 6, 8 * page_size, capture=False, pad=pad)
    steps = [
        {"a": [1, 2], "b": [3], "c": [4, 5, 6]},
        {"a": [1, 2, 7], "b": [3], "c": [4, 5, 6]},  # a gained a page
        {"b": [3, 8], "c": [4, 5, 6]},  # a finished: b and c move up a row; b gained a page
        {"d": [9], "b": [3, 8], "c": [4, 5, 6, 10]},  # a new request in front: the others move down
        {"d": [9], "b": [11, 12], "c": [4, 5, 6, 10]},  # b swapped out and back in: other pages, same count
        {"c": [4, 5, 6, 10], "d": [9, 13]},  # rows swap places
        {},  # an empty batch: every row padding, nothing remembered
        {"c": [4, 5, 6, 10], "d": [9, 13]},
    ]
    for batch in steps:
        chunks = _chunks(batch, page_size)
        graphs._fill(chunks, len(chunks) if chunks else 1)
        table = graphs._views(graphs._staging, graphs.max_batch)[4]
        for row, pages in enumerate(batch.values()):
            assert table[row, :len(pages)].tolist() == pages, (batch, row)
