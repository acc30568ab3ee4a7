"""`omniserve run-batch -i in.jsonl -o out.jsonl`: a batch file run offline (vLLM's command and format), by the same
BatchService and handlers as the server's Batch API, without HTTP. Every line's answer (or error) is written to the
output file, in input order."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from omniserve.batch.protocol import BATCH_ENDPOINTS, TERMINAL, BatchCreateRequest
from omniserve.batch.service import BatchLimits, BatchService
from omniserve.batch.store import BatchStore, write_file_atomically
from omniserve.config import ConfigError
from omniserve.engine.async_engine import AsyncEngine
from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.served_models import ServedModels
from omniserve.entrypoints.openai.serving import ServerState
from omniserve.entrypoints.openai.serving_batch import ServingLineRunner
from omniserve.entrypoints.openai.serving_chat import ChatServing
from omniserve.entrypoints.openai.serving_completions import CompletionServing
from omniserve.errors import APIError

_POLL_S = 0.2
_WINDOW = "3650d"  # offline, nothing expires


def run_batch(engine: LLMEngine, served_names: list[str], input_path: str, output_path: str,
              limits: BatchLimits = BatchLimits()) -> dict[str, int]:
    """Runs the file through the engine; returns the request counts (total, completed, failed)."""
    return asyncio.run(_run(engine, served_names, input_path, output_path, limits))


async def _run(engine: LLMEngine, served_names: list[str], input_path: str, output_path: str,
               limits: BatchLimits) -> dict[str, int]:
    endpoint = _endpoint_of(input_path)
    models = ServedModels(served_names, engine.services, str(engine.args.model or served_names[0]),
                          engine.scheduler_config.max_model_len)
    state = ServerState(engine, models)
    state.async_engine = AsyncEngine(engine)
    folder = tempfile.mkdtemp(prefix="omniserve-run-batch-")
    store = BatchStore(Path(folder) / "batches.db")
    service = BatchService(store, ServingLineRunner(state, CompletionServing(state), ChatServing(state)), limits)
    try:
        await service.start()
        with open(input_path, "rb") as source:
            uploaded = await service.upload(None, Path(input_path).name, "batch", source)
        batch = service.create(None, None, BatchCreateRequest(input_file_id=uploaded.id, endpoint=endpoint,
                                                              completion_window=_WINDOW))
        batch = await _wait(service, batch.id)
        if batch.status == "failed":
            raise ConfigError(f"{input_path}: " + "; ".join(e.message for e in batch.errors.data))
        seq = store.get_batch(batch.id).seq
        write_file_atomically(Path(output_path), (r.encode() + b"\n" for r in store.results(seq, "done", "failed")))
        return batch.request_counts.model_dump()
    except APIError as exc:
        raise ConfigError(f"{input_path}: {exc.message}") from None
    finally:
        await service.stop()
        state.async_engine.shutdown()
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


async def _wait(service: BatchService, batch_id: str):
    with tqdm(desc="lines", unit="line") as progress:
        while (batch := service.get(None, batch_id)).status not in TERMINAL:
            counts = batch.request_counts
            progress.total = counts.total or None
            progress.update(counts.completed + counts.failed - progress.n)
            await asyncio.sleep(_POLL_S)
        progress.update(batch.request_counts.completed + batch.request_counts.failed - progress.n)
    return batch


def _endpoint_of(input_path: str) -> str:
    """The endpoint the file's first line names (a line for another one goes to the errors)."""
    with open(input_path, "rb") as source:
        for raw in source:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    raise ConfigError(f"{input_path}: the first line is not a JSON object") from None
                if url not in BATCH_ENDPOINTS:
                    raise ConfigError(f"{input_path}: url must be one of {', '.join(BATCH_ENDPOINTS)}, got {url!r}")
                return url
    raise ConfigError(f"{input_path}: the file is empty")
