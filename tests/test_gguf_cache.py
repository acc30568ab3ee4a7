"""The GGUF index cache: the first load parses the file and writes an entry, later loads read it and give the same
weights, config and tokenizer; a changed file, a damaged entry or an unusable cache folder only mean the slow path.

Every test keeps its cache under a temporary folder (OMNISERVE_CACHE_DIR), never the user's."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from omniserve.models import gguf_cache
from omniserve.models.gguf_cache import entry_folder, index_from_reader, load_index

CPU = torch.device("cpu")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
]
TEXTS = ["Hello world", " héllo wörld 😀 ünïcode  spaces\n\ttabs", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>x"]


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(tmp_path / "cache"))


def _refuse_parsing(*args, **kwargs):
    raise AssertionError("the file was parsed although the cache holds its index")


# -------------------------------------------------------------------------------------- a tiny file, every case


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    """A small GGUF file with float32, float16 and Q8_0 tensors, scalar metadata and a string array."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "tiny.gguf"
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.chat_template", "{{ messages }} é")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "é"])
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(32, dtype=np.float32).astype(np.float16))
    quantised = quantize(rng.standard_normal((2, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quantised, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_views_equal_the_readers(index, path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for (entry, raw), tensor in zip(index.raw_tensors(path), reader.tensors):
        assert raw.dtype == tensor.data.dtype and raw.shape == tensor.data.shape
        assert np.array_equal(raw, tensor.data) and entry.dims == tuple(tensor.shape.tolist())


def test_first_load_writes_the_entry_and_later_loads_read_it(tiny_gguf, monkeypatch, caplog):
    from gguf import GGUFReader

    with caplog.at_level(logging.INFO, logger=gguf_cache.__name__):
        first = load_index(tiny_gguf)
    assert (entry_folder(tiny_gguf) / "index" / "index.json").is_file()
    assert "cached the GGUF index" in caplog.text
    assert first == index_from_reader(GGUFReader(tiny_gguf))
    assert first.value("tokenizer.chat_template") == "{{ messages }} é"
    assert first.array_lengths == {"tokenizer.ggml.tokens": 3}

    monkeypatch.setattr("gguf.GGUFReader", _refuse_parsing)
    second = load_index(tiny_gguf)
    assert second == first
    monkeypatch.undo()
    _assert_views_equal_the_readers(second, tiny_gguf)


def test_a_changed_file_is_parsed_again(tiny_gguf, monkeypatch):
    load_index(tiny_gguf)
    before = entry_folder(tiny_gguf)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert entry_folder(tiny_gguf) != before
    parsed = []
    original = gguf_cache.index_from_reader
    monkeypatch.setattr(gguf_cache, "index_from_reader", lambda reader: parsed.append(1) or original(reader))
    load_index(tiny_gguf)
    assert parsed and (entry_folder(tiny_gguf) / "index" / "index.json").is_file()


def test_a_new_cache_format_is_not_read_as_the_old(tiny_gguf, monkeypatch):
    load_index(tiny_gguf)
    old = entry_folder(tiny_gguf)
    monkeypatch.setattr(gguf_cache, "FORMAT_VERSION", gguf_cache.FORMAT_VERSION + 1)
    assert entry_folder(tiny_gguf) != old


@pytest.mark.parametrize("damage", ["not json", '{"format_version": 1}', "truncate", "wrong version", "past the end"])
def test_a_damaged_entry_is_ignored_and_written_again(tiny_gguf, damage, caplog):
    expected = load_index(tiny_gguf)
    index_file = entry_folder(tiny_gguf) / "index" / "index.json"
    text = index_file.read_text()
    document = json.loads(text)
    if damage == "wrong version":
        document["format_version"] = -1
    elif damage == "past the end":
        document["tensors"][-1]["data_offset"] = tiny_gguf.stat().st_size
    replacement = {"not json": "{{{", "truncate": text[: len(text) // 2]}.get(damage, damage)
    index_file.write_text(json.dumps(document) if damage in ("wrong version", "past the end") else replacement)
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert load_index(tiny_gguf) == expected
    assert "ignoring the unreadable GGUF cache entry" in caplog.text
    assert json.loads(index_file.read_text()) == json.loads(text)  # written whole again
    assert [p.name for p in index_file.parent.parent.iterdir()] == ["index"]  # no staging or old copies left


def test_an_unusable_cache_folder_means_the_slow_path(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file-not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        index = load_index(tiny_gguf)
    assert "could not cache" in caplog.text
    _assert_views_equal_the_readers(index, tiny_gguf)


def test_a_failed_write_leaves_nothing_behind(tiny_gguf, monkeypatch, caplog):
    def fail(index, folder):
        (folder / "index.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_cache, "_write_index", fail)
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        index = load_index(tiny_gguf)
    assert "disk full" in caplog.text
    assert not any(entry_folder(tiny_gguf).iterdir())
    monkeypatch.undo()
    assert load_index(tiny_gguf) == index


def test_an_entry_another_process_wrote_meanwhile_is_kept(tiny_gguf, monkeypatch):
    theirs = entry_folder(tiny_gguf) / "index"
    write = gguf_cache._write_index

    def racing_write(index, folder):  # another start publishes its entry while this one writes
        theirs.mkdir(parents=True)
        (theirs / "index.json").write_text("theirs")
        write(index, folder)

    monkeypatch.setattr(gguf_cache, "_write_index", racing_write)
    load_index(tiny_gguf)
    assert (theirs / "index.json").read_text() == "theirs"
    assert [p.name for p in theirs.parent.iterdir()] == ["index"]


# ------------------------------------------------------------------ the default model: weights, config, tokenizer


@pytest.fixture(scope="module")
def default_loads(default_gguf, tmp_path_factory):
    """The default model and tokenizer loaded into an empty cache (parsed, converted, written), then again with
    parsing and conversion refused (so read back from the cache)."""
    from transformers import AutoTokenizer

    from omniserve.models.loader import load_model
    from omniserve.tokenizer import load_tokenizer

    path = Path(default_gguf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNISERVE_CACHE_DIR", str(tmp_path_factory.mktemp("gguf-cache")))
        cold = load_model(None, CPU, torch.float32), load_tokenizer("gguf", path)
        convert = AutoTokenizer.from_pretrained

        def read_only(*args, **kwargs):
            assert "gguf_file" not in kwargs, "the tokenizer was converted although the cache holds it"
            return convert(*args, **kwargs)

        with pytest.MonkeyPatch.context() as strict:
            strict.setattr("gguf.GGUFReader", _refuse_parsing)
            strict.setattr(AutoTokenizer, "from_pretrained", read_only)
            warm = load_model(None, CPU, torch.float32), load_tokenizer("gguf", path)
        yield {"path": path, "entry": entry_folder(path), "cold": cold, "warm": warm}


def _reference_parameters(path: Path) -> dict[str, torch.Tensor]:
    """The weights loaded as before the cache: dequantised from the arrays GGUFReader gives."""
    from gguf import GGUFReader

    from omniserve.models.loader import _gguf_tensors, _load_weights, build_model, config_from_gguf

    reader = GGUFReader(path)
    index = index_from_reader(reader)
    config = config_from_gguf(index)
    model = build_model(config, 64, CPU, torch.float32)
    raw = zip(index.tensors, (tensor.data for tensor in reader.tensors))
    _load_weights(model, _gguf_tensors(raw, config), total=len(index.tensors), desc="reference")
    return dict(model.named_parameters())


def test_cached_weights_and_config_are_bit_identical(default_loads):
    (cold, _), (warm, _) = default_loads["cold"], default_loads["warm"]
    assert warm.config == cold.config and warm.kind == cold.kind == "gguf"
    reference = _reference_parameters(default_loads["path"])
    for loaded in (cold, warm):
        params = dict(loaded.model.named_parameters())
        assert params.keys() == reference.keys()
        for name, expected in reference.items():
            assert torch.equal(params[name], expected), name


def test_cached_tokenizer_behaves_identically(default_loads):
    (_, converted), (_, cached) = default_loads["cold"], default_loads["warm"]
    assert type(cached) is type(converted) and len(cached) == len(converted)
    assert cached.special_tokens_map == converted.special_tokens_map
    assert cached.all_special_ids == converted.all_special_ids
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (1, 2, 2)
    assert (converted.bos_token_id, converted.eos_token_id, converted.pad_token_id) == (1, 2, 2)
    assert cached.chat_template == converted.chat_template
    assert cached.backend_tokenizer.to_str() == converted.backend_tokenizer.to_str()  # what detokenising uses
    for text in TEXTS:
        ids = converted.encode(text)
        assert cached.encode(text) == ids
        for skip in (True, False):
            assert cached.decode(ids, skip_special_tokens=skip) == converted.decode(ids, skip_special_tokens=skip)
    for chat in CHATS:
        for prompt in (True, False):
            expected = converted.apply_chat_template(chat, add_generation_prompt=prompt)
            assert cached.apply_chat_template(chat, add_generation_prompt=prompt) == expected
            text = converted.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            assert cached.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == text


def test_a_damaged_tokenizer_entry_is_converted_again(default_loads, monkeypatch, caplog):
    from omniserve.tokenizer import load_tokenizer

    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(default_loads["entry"].parent.parent))
    (saved,) = default_loads["entry"].glob("tokenizer-*")
    (saved / "tokenizer.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        tokenizer = load_tokenizer("gguf", default_loads["path"])
    assert "ignoring the unreadable tokenizer cache entry" in caplog.text
    assert tokenizer.encode(TEXTS[1]) == default_loads["cold"][1].encode(TEXTS[1])
    json.loads((saved / "tokenizer.json").read_text())  # written whole again


def test_dequantized_weights_are_kept_and_read_back_bit_identical(tiny_gguf, monkeypatch, caplog):
    from omniserve.models.gguf_cache import load_weights

    calls = []

    def dequantize():
        calls.append(1)
        yield "a", torch.arange(6, dtype=torch.float32).view(2, 3) / 7
        yield "b", torch.full((4,), 0.1)

    with caplog.at_level(logging.INFO, logger="omniserve.models.gguf_cache"):
        cold = dict(load_weights(tiny_gguf, dequantize))
    assert "cached the dequantized weights" in caplog.text
    warm = dict(load_weights(tiny_gguf, dequantize))
    assert len(calls) == 1  # the second load read the entry
    assert cold.keys() == warm.keys() and all(torch.equal(cold[n], warm[n]) for n in cold)

    (entry_folder(tiny_gguf) / "weights" / "weights.safetensors").write_bytes(b"not a safetensors file")
    again = dict(load_weights(tiny_gguf, dequantize))  # damaged: dequantized again (and written again)
    assert len(calls) == 2 and all(torch.equal(again[n], cold[n]) for n in cold)
    assert dict(load_weights(tiny_gguf, dequantize)).keys() == cold.keys() and len(calls) == 2
