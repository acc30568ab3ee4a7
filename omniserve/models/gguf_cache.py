"""An on-disk index of GGUF files, so that only the first start with a file pays for parsing it.

`GGUFReader` parses every metadata field element by element (SmolLM2's 49k vocabulary strings take seconds), and
transformers converts the GGUF vocabulary into a tokenizer on every load. Both depend on nothing but the file, so the
first load keeps what later loads need under `cache_dir()/gguf/<file>-<key>/`:

- `index.json`: the scalar metadata (what the model config is read from) and, per tensor, where its bytes lie in the
  file and the array `GGUFReader` views them as, so later loads memory-map the file themselves;
- `tokenizer-<transformers version>/`: the converted tokenizer, as `save_pretrained` writes it;
- `weights/`: the tensors dequantized to fp32 under the model's names, as safetensors (a quantized file's blocks take
  seconds to dequantize in numpy at every start: 4 s of SmolLM2's 7; read back memory-mapped, they take a fraction
  of that). It costs the fp32 size on disk (538 MB for SmolLM2-135M).

The key hashes the file's resolved path, size and modification time with `FORMAT_VERSION`, so a changed file or a
changed layout of the cache is never read stale. Entries are written into a temporary sibling and renamed into place:
a reader sees a whole entry or none. Any entry that cannot be read or written only means the slow path (a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from omniserve.config import cache_dir

FORMAT_VERSION = 1
"""Bump when what an entry holds, or how it is read, changes: older entries are then never read."""

_INDEX_FILE = "index.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFTensorEntry:
    """Where one tensor's bytes lie in the file, and the array `GGUFReader` would give as its `.data`."""

    name: str
    tensor_type: int
    """The GGML quantisation type (a `GGMLQuantizationType` value)."""
    dims: tuple[int, ...]
    """The GGUF dimensions, fastest-varying first (`ReaderTensor.shape`)."""
    data_offset: int
    """Absolute byte offset of the tensor's data in the file."""
    dtype: str
    """The numpy dtype of the raw data, byte order included (`uint8` blocks for quantised types)."""
    data_shape: tuple[int, ...]
    """The shape of the raw array (for quantised types, rows of bytes)."""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class GGUFIndex:
    """What loading a GGUF model reads of the file besides the tensor bytes."""

    metadata: dict
    """Every scalar metadata field (numbers, strings, booleans) by key, as `ReaderField.contents()` gives it."""
    array_lengths: dict
    """The length of every array field (e.g. `tokenizer.ggml.tokens`) by key."""
    tensors: tuple[GGUFTensorEntry, ...]

    def value(self, key: str, default=None):
        return self.metadata.get(key, default)

    def raw_tensors(self, path: Path) -> Iterator[tuple[GGUFTensorEntry, np.ndarray]]:
        """Each tensor with its raw data, viewed from a memory map of the file exactly as `GGUFReader` views it."""
        file = np.memmap(path, mode="r")
        for entry in self.tensors:
            raw = file[entry.data_offset : entry.data_offset + entry.nbytes].view(np.dtype(entry.dtype))
            yield entry, raw.reshape(entry.data_shape)


def index_from_reader(reader) -> GGUFIndex:
    """The index of a parsed file (the slow path, and what gets cached)."""
    from gguf import GGUFValueType

    metadata, array_lengths = {}, {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            array_lengths[key] = len(field.data)
            continue
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError:  # a malformed string nobody reads must not stop the load
            continue
    tensors = tuple(
        GGUFTensorEntry(
            name=t.name, tensor_type=int(t.tensor_type), dims=tuple(int(d) for d in t.shape),
            data_offset=int(t.data_offset), dtype=t.data.dtype.str, data_shape=tuple(int(d) for d in t.data.shape),
        )
        for t in reader.tensors
    )
    return GGUFIndex(metadata=metadata, array_lengths=array_lengths, tensors=tensors)


# ------------------------------------------------------------------------------------------------ entries on disk


def entry_folder(path: Path) -> Path | None:
    """The cache entry of this version of the file; None when the file or the cache location cannot be known."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
        root = cache_dir() / "gguf"
    except (OSError, RuntimeError):  # RuntimeError: no home directory to put the default cache in
        return None
    key = json.dumps([FORMAT_VERSION, str(resolved), stat.st_size, stat.st_mtime_ns])
    return root / f"{resolved.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _read_index(folder: Path, file_size: int) -> GGUFIndex:
    document = json.loads((folder / _INDEX_FILE).read_text())
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {document.get('format_version')!r}, expected {FORMAT_VERSION}")
    tensors = tuple(
        GGUFTensorEntry(**{**t, "dims": tuple(t["dims"]), "data_shape": tuple(t["data_shape"])})
        for t in document["tensors"]
    )
    if any(t.data_offset < 0 or t.data_offset + t.nbytes > file_size for t in tensors):
        raise ValueError("a tensor lies outside the file")  # a damaged entry must not memory-map past the end
    metadata, array_lengths = dict(document["metadata"]), dict(document["array_lengths"])
    return GGUFIndex(metadata=metadata, array_lengths=array_lengths, tensors=tensors)


def _write_index(index: GGUFIndex, folder: Path) -> None:
    document = {
        "format_version": FORMAT_VERSION,
        "metadata": index.metadata,
        "array_lengths": index.array_lengths,
        "tensors": [asdict(t) for t in index.tensors],
    }
    (folder / _INDEX_FILE).write_text(json.dumps(document))


def _publish(target: Path, write: Callable[[Path], None], replace: bool) -> bool:
    """Runs `write` into a temporary folder beside `target`, then renames it into place, so that no reader ever
    sees a part-written entry; `replace`: `target` was found but failed to load. False (and a warning) when that
    fails: the caller already has what it loaded."""
    staging = trash = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        write(staging)
        if target.exists() and not replace:  # another process wrote it meanwhile: keep theirs, which may be in use
            return True
        if target.exists():  # move the damaged entry aside, as rename will not replace a folder
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, trash / target.name)
        os.replace(staging, target)
        return True
    except Exception as exc:  # a full disk, a read-only cache, a racing writer: the load itself succeeded
        logger.warning("could not cache %s (%s): later starts will parse the GGUF file again", target, exc)
        return False
    finally:
        for leftover in (staging, trash):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- the loaders


def load_index(path: Path) -> GGUFIndex:
    """The index of a GGUF file: from the cache when it holds this version of the file, else parsed (and cached)."""
    folder = entry_folder(path)
    index_folder = folder / "index" if folder else None
    found = index_folder is not None and index_folder.is_dir()
    if found:
        try:
            return _read_index(index_folder, path.stat().st_size)
        except Exception as exc:  # damaged or foreign: parse the file and write the entry again
            logger.warning("ignoring the unreadable GGUF cache entry %s (%s)", index_folder, exc)
    from gguf import GGUFReader

    index = index_from_reader(GGUFReader(path))
    if index_folder is not None and _publish(index_folder, lambda staging: _write_index(index, staging), found):
        logger.info("cached the GGUF index of %s in %s: later starts skip parsing", path, index_folder)
    return index


def load_tokenizer(path: Path):
    """The transformers tokenizer of a GGUF file: from the cache when it holds one, else converted (and cached)."""
    import transformers
    from transformers import AutoTokenizer

    folder = entry_folder(path)
    # The conversion is transformers' own: another version may convert differently, so it gets its own entry.
    saved = folder / f"tokenizer-{transformers.__version__}" if folder else None
    found = saved is not None and saved.is_dir()
    if found:
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except Exception as exc:
            logger.warning("ignoring the unreadable tokenizer cache entry %s (%s)", saved, exc)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if saved is not None and _publish(saved, tokenizer.save_pretrained, found):
        logger.info("cached the tokenizer of %s in %s: later starts skip converting it", path, saved)
    return tokenizer


_WEIGHTS_FILE = "weights.safetensors"


def load_weights(path: Path, dequantize: Callable[[], Iterator[tuple[str, torch.Tensor]]]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's weights as (name, fp32 tensor): from the cache when it holds them, else from `dequantize()`, kept
    (once all of them were taken) for later starts."""
    folder = entry_folder(path)
    saved = folder / "weights" if folder else None
    found = saved is not None and (saved / _WEIGHTS_FILE).is_file()
    if found:
        try:
            yield from _read_weights(saved / _WEIGHTS_FILE)
            return
        except Exception as exc:  # damaged (found when it is opened, before any tensor): dequantize again
            logger.warning("ignoring the unreadable weights cache entry %s (%s)", saved, exc)
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in dequantize():
        kept[name] = tensor
        yield name, tensor
    if saved is not None and _publish(saved, lambda staging: _write_weights(kept, staging), found):
        logger.info("cached the dequantized weights of %s in %s: later starts skip dequantizing", path, saved)


def _read_weights(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as weights:  # checks the header against the file's size first
        for name in weights.keys():
            yield name, weights.get_tensor(name)


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, folder / _WEIGHTS_FILE)
