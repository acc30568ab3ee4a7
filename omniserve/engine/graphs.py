"""Decode iterations replayed from CUDA graphs, one per padded batch size.

A decode iteration with no prefill chunk and no offloaded row has the same ops every time, only the batch size
changes: so the forward pass of each padded batch size ("bucket": 1, 2, 4, 8, then every 8 up to max_num_seqs) is
captured once at start-up and replayed, one launch for the whole model instead of ~10 per layer from the host. Its
inputs live in static buffers, all views of one flat device tensor, filled each iteration with one copy from a
pinned staging twin:

    token_ids [max_batch]  positions [max_batch]  write_slots [max_batch]  context_lens [max_batch]
    page_table [max_batch, max_pages]

A batch of n rows runs in the smallest bucket b >= n; rows n..b-1 are padding: token 0 at position 0, write slot -1
(ops.store_kv skips it, so a padding row writes no KV), context 1 (it reads page 0's first slot, whatever it
holds: its output is dropped). Every op is row-wise, so padding never changes a real row.

Iterations with prefill chunks or offloaded rows run eagerly (runner.py): their shapes and the CPU pool's results
change within the iteration.

On the CPU nothing is captured: the same static-buffer forward runs eagerly, on exactly the batch's rows (padding
would only add GEMM rows), and it is the CPU's decode path, because it is the leanest: each layer's tensors fetched
once (llama.LayerWeights), one operator call after another with no per-layer bookkeeping for offloaded rows. With
padding kept, the same eager run is how the GPU's bookkeeping is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from array import array

import torch

from omniserve import ops
from omniserve.engine.scheduler.plan import ScheduledChunk
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.llama import LlamaForCausalLM
from omniserve.ops.transfer import long_tensor

logger = logging.getLogger(__name__)

_FIELDS = 4  # token ids, positions, write slots, context lengths; then the page table


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes captured: 1, 2, 4, 8, then every 8, the last being max_batch."""
    buckets = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return buckets + [max_batch]


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, pool: PagePool, device: torch.device, max_batch: int,
                 max_context: int, capture: bool, pad: bool = True) -> None:
        """`capture`: capture CUDA graphs now; `pad`: run a batch in its bucket (what a captured graph needs), else
        in exactly its rows. The model's weights must be loaded: each layer's tensors are fetched here, once."""
        self.model, self.pool, self.device = model, pool, device
        self.layers = [layer.weights() for layer in model.layers]
        self.pad = pad or capture
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        self.max_pages = -(-max_context // pool.page_size)
        size = max_batch * (_FIELDS + self.max_pages)
        self._inputs = torch.zeros(size, dtype=torch.long, device=device)
        self._staging = self._inputs if device.type != "cuda" else torch.zeros(size, dtype=torch.long,
                                                                               pin_memory=True)
        self._placed: dict[str, tuple[int, list[int]]] = {}
        """The last batch's requests: the staging page-table row each was in, and the pages written there. A request
        that only gained pages since gets only the new entries (moved with its row if the row changed): the table
        is updated, not rebuilt, each step."""
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether these chunks are a decode batch that a bucket holds."""
        return (0 < len(chunks) <= self.max_batch
                and all(len(c.token_ids) == 1 and c.sample and len(c.page_ids) <= self.max_pages for c in chunks))

    def _views(self, buffer: torch.Tensor, bucket: int):
        """(token_ids, positions, write_slots, context_lens, page_table) of the first `bucket` rows."""
        rows = self.max_batch
        fields = [buffer[i * rows: i * rows + bucket] for i in range(_FIELDS)]
        table = buffer[_FIELDS * rows:].view(rows, self.max_pages)[:bucket]
        return (*fields, table)

    def _fill(self, chunks: list[ScheduledChunk], bucket: int) -> None:
        """Writes the batch into the staging buffer (padding rows as the module docstring says), then copies the
        part that this bucket reads to the device's static inputs in one asynchronous copy. The previous step's copy
        out of the staging buffer is over: that step waited for its sampled ids, which come after it on the
        stream."""
        token_ids, positions, write_slots, context_lens, table = self._views(self._staging, bucket)
        page_size, n = self.pool.page_size, len(chunks)
        if n:
            token_ids[:n] = long_tensor(c.token_ids[0] for c in chunks)
            positions[:n] = long_tensor(c.start_position for c in chunks)
            write_slots[:n] = long_tensor(c.page_ids[c.start_position // page_size] * page_size
                                          + c.start_position % page_size for c in chunks)
            context_lens[:n] = positions[:n] + 1
            self._write_page_tables(chunks)
        else:
            self._placed = {}  # every row becomes padding
        token_ids[n:], positions[n:], write_slots[n:], context_lens[n:], table[n:, 0] = 0, 0, -1, 1, 0
        if self._staging is not self._inputs:
            # Rows past the bucket are as they were when last copied: only the fields and the bucket's rows go.
            used = _FIELDS * self.max_batch + bucket * self.max_pages
            self._inputs[:used].copy_(self._staging[:used], non_blocking=True)

    def _write_page_tables(self, chunks: list[ScheduledChunk]) -> None:
        """Each row's pages into the staging page table. A request that was in the last batch with a prefix of these
        pages has its row moved (all such moves in one indexed copy) and only its new pages written (all in one
        indexed write; a decode row gains one every page_size steps); any other row is written whole. Entries past
        a row's pages are never read (its context ends before them), so stale ones stay: they are page ids of this
        pool all the same."""
        table = self._staging[_FIELDS * self.max_batch:].view(self.max_batch, self.max_pages)
        moved_from: list[int] = []
        moved_to: list[int] = []
        moved_width = 0
        appended = array("q")  # flat indexes into the table
        values = array("q")
        whole: list[tuple[int, list[int]]] = []
        placed: dict[str, tuple[int, list[int]]] = {}
        for row, chunk in enumerate(chunks):
            pages = chunk.page_ids
            before, old = self._placed.get(chunk.request_id, (row, None))
            if old is not None and old == pages:  # most rows, most steps: nothing new
                placed[chunk.request_id] = (row, old)
            elif old is not None and len(old) < len(pages) and pages[:len(old)] == old:
                base = row * self.max_pages
                appended.extend(range(base + len(old), base + len(pages)))
                values.extend(pages[len(old):])
                placed[chunk.request_id] = (row, list(pages))  # a copy: the chunk's list is not ours to keep
            else:
                whole.append((row, pages))
                placed[chunk.request_id] = (row, list(pages))
                continue
            if before != row:
                moved_from.append(before)
                moved_to.append(row)
                moved_width = max(moved_width, len(old))
        if moved_to:  # the right side is gathered before any row is written: rows may move onto each other's
            table[moved_to, :moved_width] = table[moved_from, :moved_width]
        if appended:
            table.view(-1)[long_tensor(appended)] = long_tensor(values)
        for row, pages in whole:
            table[row, :len(pages)] = long_tensor(pages)
        self._placed = placed

    def forward(self, bucket: int) -> torch.Tensor:
        """The model over the static inputs of `bucket` rows: their last hidden states [bucket, hidden_size]. What
        a graph captures, and what runs eagerly where there is none."""
        model, pool = self.model, self.pool
        token_ids, positions, write_slots, context_lens, table = self._views(self._inputs, bucket)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ops.store_kv(k, v, pool.k[layer], pool.v[layer], write_slots)
            return ops.paged_decode(q, pool.k[layer], pool.v[layer], table, context_lens, pool.page_size)

        return model.run_layers(model.embed(token_ids), model.rope_angles(positions), attend, self.layers)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """The decode batch's last hidden states [len(chunks), hidden_size], replayed (or run eagerly)."""
        bucket = next(b for b in self.buckets if b >= len(chunks)) if self.pad else len(chunks)
        self._fill(chunks, bucket)
        graph = self._graphs.get(bucket)
        if graph is None:
            return self.forward(bucket)[: len(chunks)]
        graph.replay()
        return self._outputs[bucket][: len(chunks)]

    def _capture(self) -> None:
        """One graph per bucket, largest first so that the smaller ones reuse its memory (one shared pool)."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        memory_pool = torch.cuda.graph_pool_handle()
        self._fill([], self.max_batch)  # every row padding: the captures write no KV
        for bucket in reversed(self.buckets):
            self.forward(bucket)  # warm-up: kernels compiled and tuned outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self._outputs[bucket] = self.forward(bucket)
            self._graphs[bucket] = graph
            logger.info("captured the decode graph of %d rows (%d of %d)", bucket, len(self._graphs),
                        len(self.buckets))
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d decode graphs in %.1f s, using %.0f MiB of device memory", len(self._graphs),
                    time.perf_counter() - started, used / 2**20)
