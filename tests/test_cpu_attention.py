"""The CPU decode-attention kernel and the host KV store, against plain attention; how the kernel is built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omniserve.cpu_attention import kernel
from omniserve.cpu_attention.host_kv import HostKV
from omniserve.cpu_attention.kernel import (
    compiled_kernel, decode_attention, decode_attention_reference, tile_keys, untile_keys,
)


def naive(q, k, v):
    """Per head, written out: q [heads, dim], k/v [kv_heads, len, dim]."""
    heads, dim = q.shape
    group = heads // k.shape[0]
    out = []
    for h in range(heads):
        keys, values = k[h // group], v[h // group]
        weights = torch.softmax(keys @ q[h] / dim**0.5, dim=0)
        out.append(weights @ values)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, length",
    [(9, 3, 64, 1), (9, 3, 64, 17), (32, 8, 128, 300), (4, 4, 48, 33), (8, 1, 80, 129), (28, 4, 128, 1000),
     (6, 6, 32, 16)],
)
def test_kernel_matches_reference(dtype, heads, kv_heads, dim, length):
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(heads, dim, generator=generator, dtype=dtype)
    k = torch.randn(kv_heads, length, dim, generator=generator, dtype=dtype)
    v = torch.randn(kv_heads, length, dim, generator=generator, dtype=dtype)
    expected = naive(q, k, v)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(decode_attention(q, tile_keys(k, capacity_tiles=100), v), expected, **tolerance)
    torch.testing.assert_close(decode_attention_reference(q, k, v), expected, **tolerance)


def test_kernel_is_built_here():
    assert compiled_kernel() is not None, "the compiled CPU kernel did not build; see the warning in the log"


def test_host_kv_appends_grow_and_export_round_trips():
    layers, tokens, kv_heads, dim = 2, 5, 3, 16
    k = torch.randn(layers, tokens, kv_heads, dim)
    v = torch.randn(layers, tokens, kv_heads, dim)
    kv = HostKV(k, v)
    extra_k, extra_v = torch.randn(40, layers, kv_heads, dim), torch.randn(40, layers, kv_heads, dim)
    for step in range(40):  # past the first capacity, so buffers grow
        for layer in range(layers):
            key_tiles, values = kv.append(layer, extra_k[step, layer], extra_v[step, layer])
            assert values.shape[1] == tokens + step + 1
            full_k = torch.cat([k[layer], extra_k[: step + 1, layer]]).transpose(0, 1)
            torch.testing.assert_close(untile_keys(key_tiles, values.shape[1]), full_k)
    out_k, out_v = kv.export()
    torch.testing.assert_close(out_k, torch.cat([k, extra_k.transpose(0, 1)], dim=1))
    torch.testing.assert_close(out_v, torch.cat([v, extra_v.transpose(0, 1)], dim=1))
    kv.append(0, extra_k[0, 0], extra_v[0, 0])
    with pytest.raises(RuntimeError, match="middle of a token"):
        kv.export()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_paged_decode_matches_the_torch_path(dtype):
    """The device's own decode attention when the device is the CPU: the compiled kernel reads each row's slots in
    place; the torch path gathers and pads. Same result, rows of very different lengths, GQA groups of 3."""
    from omniserve.attention import PagedAttention
    from omniserve.attention.backends.compiled_cpu import CompiledCPUDecode
    from omniserve.attention.backends.torch_gather import TorchGatherDecode
    from omniserve.config import ModelConfig
    from omniserve.kv_cache.page_pool import PagePool

    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=9 * 64, intermediate_size=64, num_layers=1,
                         num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=10)
    pool = PagePool(config, num_pages=64, page_size=4, device=torch.device("cpu"), dtype=dtype)
    torch.manual_seed(0)
    pool.k[0].normal_()
    pool.v[0].normal_()
    compiled = PagedAttention(pool, torch.device("cpu"))
    fallback = PagedAttention(pool, torch.device("cpu"), decode_backend=TorchGatherDecode(4, torch.device("cpu")))
    lens = [1, 5, 37, 120]
    spans, first_page = [], 0
    for length in lens:
        pages = list(range(first_page, first_page + -(-length // 4)))[::-1]  # scattered, in reverse order
        spans.append((length - 1, 1, pages))
        first_page += len(pages)
    q, k, v = (torch.randn(len(lens), heads, 64, dtype=dtype) for heads in (9, 3, 3))
    assert isinstance(compiled.decode_backend, CompiledCPUDecode)
    got = compiled(0, q, k, v, compiled.build_metadata(spans))
    expected = fallback(0, q, k, v, fallback.build_metadata(spans))
    torch.testing.assert_close(got, expected)


# Building the kernel: never blocked by a dead builder, bounded in time, keyed by what the binary depends on.


def _hold_lock_then_die(lock_path) -> None:
    """A builder that took the build lock and was killed (kill -9) while it held it: its lock file stays behind."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(600)"), str(lock_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()


TINY_EXTENSION = """#include <Python.h>
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "omniserve_cpu_decode_attention", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_omniserve_cpu_decode_attention() { return PyModule_Create(&module); }
"""
"""An extension of the kernel's name that compiles in a second: the build machinery under test is the same (the
real kernel's build is test_kernel_is_built_here's, and set-up's)."""


def test_stale_locks_do_not_block_the_build(tmp_path, monkeypatch, caplog):
    """A start killed while compiling left torch's lock and ours: the next start builds (or falls back) all the
    same, says so in the log, and later starts load that build without compiling again. The build removes the
    builds of other keys no process has loaded for a week, and keeps the others."""
    source = tmp_path / "src" / "tiny.cpp"
    source.parent.mkdir()
    source.write_text(TINY_EXTENSION)
    monkeypatch.setattr(kernel, "_SOURCES", (source,))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # torch's own build folder: here, with a stale lock
    (tmp_path / "omniserve_cpu_decode_attention").mkdir()
    (tmp_path / "omniserve_cpu_decode_attention" / "lock").touch()
    target = kernel.kernel_dir()
    _hold_lock_then_die(tmp_path / f".{target.name}.lock")
    old_builds = {}  # builds of other keys, one unused for longer than the kernel keeps them
    for key, age_s in (("old", kernel.STALE_BUILD_S + 3600), ("recent", 3600)):
        folder = tmp_path / f"omniserve_cpu_decode_attention-{key}"
        folder.mkdir()
        (folder / "omniserve_cpu_decode_attention.so").touch()
        os.utime(folder / "omniserve_cpu_decode_attention.so", (time.time() - age_s, time.time() - age_s))
        (tmp_path / f".{folder.name}.lock").touch()
        old_builds[key] = folder
    caplog.set_level(logging.INFO, logger=kernel.__name__)
    module = kernel.load_kernel()
    assert "building the CPU decode-attention kernel" in caplog.text
    assert module is not None, caplog.text
    assert module.__file__ == str(target / "omniserve_cpu_decode_attention.so")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.build")) == []
    assert not old_builds["old"].exists() and not (tmp_path / f".{old_builds['old'].name}.lock").exists()
    assert old_builds["recent"].exists()  # another checkout's, still in use

    def no_compiling(build_dir, timeout_s):
        raise AssertionError("rebuilt a kernel that was built already")

    monkeypatch.setattr(kernel, "_compile", no_compiling)
    assert kernel.load_kernel().__file__ == module.__file__


def test_a_live_builder_is_waited_for_only_until_the_timeout(tmp_path, caplog):
    target = kernel.kernel_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('4242'); f.flush(); print('locked', flush=True); time.sleep(600)"),
        str(tmp_path / f".{target.name}.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        caplog.set_level(logging.INFO, logger=kernel.__name__)
        assert kernel.load_kernel(tmp_path, timeout_s=1.0) is None
    finally:
        holder.kill()
        holder.wait()
    assert "waiting for process 4242" in caplog.text
    assert "still building" in caplog.text and "slower torch path" in caplog.text


def test_a_failing_build_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that fails whatever it is given
    assert kernel.load_kernel(tmp_path) is None
    assert "could not be built (the build failed" in caplog.text and "slower torch path" in caplog.text
    assert not kernel.kernel_dir(tmp_path).exists()
    # Later starts (every worker's) do not try again and wait on it; the set-up command does.
    builds = []
    monkeypatch.setattr(kernel, "_compile", lambda build_dir, timeout_s: builds.append(1))
    caplog.clear()
    assert kernel.load_kernel(tmp_path) is None and not builds
    assert "failed to build before (the build failed" in caplog.text and "omniserve build-kernel" in caplog.text
    kernel.build_kernel(tmp_path)
    assert builds == [1] and not kernel._failure_record(kernel.kernel_dir(tmp_path)).exists()


def test_a_build_past_its_time_limit_is_ended_and_falls_back(tmp_path, monkeypatch, caplog):
    """The build and what it started (the compilers) are killed; nothing half-built is left."""
    grandchild_pid = tmp_path / "grandchild.pid"
    hanging_build = ("import subprocess, sys, time; "
                     "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                     f"open({str(grandchild_pid)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    monkeypatch.setattr(kernel, "_build_command", lambda build_dir: [sys.executable, "-c", hanging_build])
    assert kernel.load_kernel(tmp_path, timeout_s=3.0) is None
    assert "longer than 3 s" in caplog.text
    assert not kernel.kernel_dir(tmp_path).exists()
    assert [p.name for p in tmp_path.iterdir() if ".build-" in p.name] == []
    if grandchild_pid.exists():  # the compiler stand-in had started: it must be gone too (or a zombie)
        stat = Path(f"/proc/{int(grandchild_pid.read_text())}/stat")

        def alive() -> bool:
            try:
                return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 10  # SIGKILL is sent; the process exits once the kernel next runs it
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive()


def test_kernel_key_changes_with_source_flags_torch_and_cpu(monkeypatch):
    source = b"".join(path.read_bytes() for path in kernel._SOURCES)
    key = kernel.kernel_key(source, isa="fpu sse2 avx2")
    assert key == kernel.kernel_key(source, isa="fpu sse2 avx2")  # same source, flags, CPU: one shared build
    assert key != kernel.kernel_key(source + b"\n// changed", isa="fpu sse2 avx2")
    assert key != kernel.kernel_key(source, flags=("-O2", "-march=native"), isa="fpu sse2 avx2")
    assert key != kernel.kernel_key(source, isa="fpu sse2 avx2 avx512f")
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key != kernel.kernel_key(source, isa="fpu sse2 avx2")
    assert kernel.cpu_isa()  # this machine's instruction set is known, so it is part of the default key


def test_build_kernel_command_leaves_the_kernel_that_run_time_loads(capsys):
    """`omniserve build-kernel` (the set-up step) builds into the folder compiled_kernel() loads from."""
    from omniserve.entrypoints.cli import main

    main(["build-kernel"])
    assert capsys.readouterr().out.strip() == f"CPU decode-attention kernel: {kernel.kernel_dir()}"
    assert kernel.compiled_kernel().__file__ == str(kernel.kernel_dir() / "omniserve_cpu_decode_attention.so")


def test_the_worker_gives_freed_host_kv_back_to_the_os(monkeypatch):
    """glibc keeps freed host KV in the worker's heap: the store trims it once 64 MiB were freed or none is left."""
    from omniserve.cpu_attention import worker
    from omniserve.cpu_attention.messages import Export, Free, LoadKV

    trims = []
    monkeypatch.setattr(worker, "trim_heap", lambda: trims.append(1))
    store = worker.AttentionStore()
    small = torch.zeros(2, 4, 1, 8)  # [layers, tokens, kv_heads, head_dim]
    big = torch.zeros(1, 256 * 1024, 2, 8)  # held with room to double: 64 MiB of fp32 k and v
    for request_id, kv in (("a", small), ("b", small), ("c", big)):
        store.handle(LoadKV(request_id, kv, kv))
    store.handle(Free(["a"]))
    assert not trims  # a few bytes freed, KV still held
    store.handle(Export("c"))
    store.handle(Free(["unknown"]))
    assert len(trims) == 1 and store.freed_bytes == 0  # 64 MiB freed by the export
    store.handle(Free(["b"]))
    assert len(trims) == 2 and not store.kv  # the last request gone


@pytest.mark.parametrize("mapped_apart", [True, False])
def test_large_buffers_are_handed_back_when_freed_not_at_the_next_trim(mapped_apart):
    """A worker maps its large buffers apart (omniserve.malloc.map_large_allocations): freed host KV leaves its RSS at
    once, even with small buffers allocated after it still alive. Without it (the control), glibc, having seen a
    large buffer freed, puts the next ones on its heap, where the small survivors keep their pages until a trim. Run
    in a process of its own: the setting is for the process's life."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        pytest.skip("not glibc")
    script = """
import os, sys, torch
from omniserve.malloc import map_large_allocations
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "1":
    assert map_large_allocations(256 << 10)
earlier = torch.ones(1 << 20)  # a request's host KV freed before: glibc raises its threshold past this size
del earlier
before, large, small = rss(), [], []
for i in range(64):  # 64-128 MiB of host-KV-sized buffers, each followed by a small one that outlives it
    large.append(torch.ones(262144 + 4096 * i))
    small.append(torch.ones(64))
held = rss() - before
large.clear()
print(held, rss() - before)
"""
    result = subprocess.run([sys.executable, "-c", script, str(int(mapped_apart))], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    held, left = map(int, result.stdout.split())
    assert held > 64 << 20
    assert left < 8 << 20 if mapped_apart else left > held // 2


def test_a_swap_out_crosses_the_pipe_as_raw_bytes_and_arrives_whole():
    """send_message writes a LoadKV's KV as raw bytes after the message (half precision as fp32, a non-contiguous
    view made contiguous); receive_message reads them back into the receiver's own writable arrays. Other messages go
    as they are, in order."""
    import multiprocessing
    import threading

    from omniserve.cpu_attention.messages import Free, LoadKV, receive_message, send_message

    reading, writing = multiprocessing.Pipe(duplex=False)
    k = torch.randn(2, 300, 3, 64).bfloat16()  # [layers, tokens, kv_heads, head_dim]: larger than a pipe's buffer
    v = torch.randn(2, 3, 300, 64).transpose(1, 2)
    sender = threading.Thread(target=lambda: [send_message(writing, m) for m in
                                              (LoadKV("r", k, v, (4, 5)), Free(["x"]))])
    sender.start()
    loaded, freed = receive_message(reading), receive_message(reading)
    sender.join(timeout=30)
    assert (loaded.request_id, loaded.prefix_pages, freed) == ("r", (4, 5), Free(["x"]))
    assert loaded.k.dtype == loaded.v.dtype == np.float32 and loaded.k.flags.writeable
    assert torch.equal(torch.from_numpy(loaded.k), k.float()) and torch.equal(torch.from_numpy(loaded.v), v)
