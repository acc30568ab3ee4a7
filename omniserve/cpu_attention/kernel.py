"""Decode attention for one request over its host KV (GQA aware): a compiled kernel, with a torch fallback.

The host KV keeps keys in tiles of 16 positions, transposed inside each tile ([kv_heads, tiles, head_dim, 16]), and
values as rows ([kv_heads, length, head_dim]); see csrc/decode_attention.cpp for why.

The kernel is built at set-up (`omniserve build-kernel`, which `make setup` runs) into a folder of the extensions
cache named by a key of everything the binary depends on: the source, the flags, torch, the Python ABI and, since it
is compiled with -march=native, the CPU's instruction set. So checkouts with the same source share one build, a
changed source gets its own, and a home folder shared by different machines never loads a binary built for another
CPU. At run time the prebuilt kernel is loaded as it is; it is built then only if set-up did not.

A build never waits on a dead process: it compiles in a private temporary folder, in a subprocess with a time limit,
and moves the result into place with one atomic rename, under an OS lock (flock) that the kernel releases when its
holder dies, whatever killed it. If the build fails or runs past its limit, the torch fallback computes the same
thing, more slowly, and a warning says so.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

TILE = 16
_NAME = "omniserve_cpu_decode_attention"
_SOURCES = (Path(__file__).parent / "csrc" / "decode_attention.cpp",
            Path(__file__).parents[1] / "ops" / "csrc" / "dense_ops.cpp",
            Path(__file__).parents[1] / "ops" / "csrc" / "prefill_attention.cpp",
            Path(__file__).parents[1] / "ops" / "csrc" / "skinny_linear.cpp")
"""The project's C++ extension: the decode-attention kernels, the fused dense operators, the paged prefill
attention and the decode batch's GEMM (ops/)."""
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
BUILD_TIMEOUT_S = 300.0
"""Longest a build (waiting for another process's build included) may take before the torch fallback is used."""
STALE_BUILD_S = 7 * 86400
"""A build of another key (an older source, other flags or torch) that no process has loaded for this long is
removed when a new one is made: each is megabytes, and every change of the source would leave one more."""


def extensions_root() -> Path:
    """Where compiled extensions are cached: torch's convention ($TORCH_EXTENSIONS_DIR, else the XDG cache)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def cpu_isa() -> str:
    """The CPU's instruction-set extensions (the flags line of /proc/cpuinfo): what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def kernel_key(source: bytes | None = None, flags: tuple[str, ...] = _FLAGS, isa: str | None = None) -> str:
    """A hash of everything the compiled binary depends on (defaults: these sources, flags and CPU)."""
    source = b"".join(path.read_bytes() for path in _SOURCES) if source is None else source
    parts = [hashlib.sha256(source).hexdigest(), " ".join(flags), torch.__version__,
             sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag, isa or cpu_isa()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def kernel_dir(root: Path | None = None) -> Path:
    """The folder the kernel of this source, flags and CPU is built into."""
    return (root or extensions_root()) / f"{_NAME}-{kernel_key()}"


def _build_command(build_dir: Path) -> list[str]:
    """Compiles the extension into build_dir (torch's tooling, in a fresh process so that it can be timed out)."""
    code = ("import sys; from torch.utils.cpp_extension import load; "
            "load(sys.argv[1], sys.argv[2].split('\\n'), extra_cflags=sys.argv[4:], build_directory=sys.argv[3])")
    return [sys.executable, "-c", code, _NAME, "\n".join(map(str, _SOURCES)), str(build_dir), *_FLAGS]


def _compile(build_dir: Path, timeout_s: float) -> None:
    """Runs the build; raises on failure or timeout. Its own process group, so a timeout also ends the compilers."""
    process = subprocess.Popen(_build_command(build_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, text=True)
    try:
        output, _ = process.communicate(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise TimeoutError(f"the build took longer than {timeout_s:.0f} s") from None
    if process.returncode != 0:
        tail = [line for line in output.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"the build failed: {' | '.join(tail)}")


def _lock(lock_file, deadline: float) -> None:
    """Takes the build lock, waiting for a live builder until the deadline. A dead holder's lock is already gone."""
    announced = False
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("another process was still building it") from None
            if not announced:
                lock_file.seek(0)
                logger.info("waiting for process %s, which is building the CPU decode-attention kernel",
                            lock_file.read().strip() or "?")
                announced = True
            time.sleep(0.2)


def build_kernel(root: Path | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> Path | None:
    """Builds the kernel into kernel_dir(root) unless it is there; returns that folder, or None (with a warning) if
    it could not be built within timeout_s."""
    target = kernel_dir(root)
    if (target / f"{_NAME}.so").exists():
        return target
    deadline = time.monotonic() + timeout_s
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "a+") as lock_file:
            _lock(lock_file, deadline)
            if (target / f"{_NAME}.so").exists():  # built by the process we waited for
                return target
            lock_file.truncate(0)
            lock_file.write(str(os.getpid()))
            lock_file.flush()
            for leftover in target.parent.glob(f".{target.name}.build-*"):  # of builders killed midway
                shutil.rmtree(leftover, ignore_errors=True)
            logger.info("building the CPU decode-attention kernel into %s (once per source, flags and CPU)", target)
            started = time.monotonic()
            build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
            try:
                try:
                    _compile(build_dir, deadline - time.monotonic())
                except Exception as exc:
                    _failure_record(target).write_text(f"{exc}\n")  # run-time loads do not try again
                    raise
                _failure_record(target).unlink(missing_ok=True)
                shutil.rmtree(target, ignore_errors=True)  # a damaged build (its .so deleted), never a whole one
                build_dir.chmod(0o755)  # mkdtemp's folder is private; the cache may be shared
                build_dir.rename(target)  # atomic: readers see the whole build or none
            finally:
                shutil.rmtree(build_dir, ignore_errors=True)
            logger.info("built the CPU decode-attention kernel in %.0f s", time.monotonic() - started)
            _remove_stale_builds(target)
            return target
    except Exception as exc:  # no compiler, a failed or slow build: fall back, loudly
        logger.warning("CPU decode-attention kernel could not be built (%s); using the slower torch path", exc)
        return None


def _remove_stale_builds(target: Path) -> None:
    """Removes the builds of other keys beside `target` that no process has loaded for STALE_BUILD_S (a load reads
    the .so, which sets its access time, at least daily under relatime), with their lock and failure records; a
    process that has one loaded keeps its mapping."""
    now = time.time()
    for other in target.parent.glob(f"{_NAME}-*"):
        if other == target or not other.is_dir():
            continue
        library = other / f"{_NAME}.so"
        try:
            last_used = max(library.stat().st_atime, library.stat().st_mtime) if library.exists() else (
                other.stat().st_mtime)
        except OSError:
            continue  # removed by another process meanwhile
        if now - last_used > STALE_BUILD_S:
            logger.info("removing the CPU decode-attention kernel build %s, unused for %.0f days", other,
                        (now - last_used) / 86400)
            shutil.rmtree(other, ignore_errors=True)
            (other.parent / f".{other.name}.lock").unlink(missing_ok=True)
            _failure_record(other).unlink(missing_ok=True)


def _failure_record(target: Path) -> Path:
    """Where a failed build of `target` leaves its error, beside it in the cache."""
    return target.parent / f".{target.name}.failed"


def load_kernel(root: Path | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> ModuleType | None:
    """The compiled kernel: the prebuilt one, else built now (bounded by timeout_s); None if there is none. A build
    of this key that failed before is not tried again here (every worker start would wait on it, up to timeout_s
    each time): `omniserve build-kernel` tries again."""
    failed = _failure_record(kernel_dir(root))
    if not (kernel_dir(root) / f"{_NAME}.so").exists() and failed.exists():
        logger.warning("the CPU decode-attention kernel failed to build before (%s); using the slower torch path. "
                       "`omniserve build-kernel` tries again", failed.read_text().strip())
        return None
    if not (kernel_dir(root) / f"{_NAME}.so").exists():
        logger.warning("the CPU decode-attention kernel was not built at set-up (omniserve build-kernel): "
                       "building it now")
    target = build_kernel(root, timeout_s)
    if target is None:
        return None
    try:
        spec = importlib.util.spec_from_file_location(_NAME, target / f"{_NAME}.so")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as exc:  # ImportError or OSError: a damaged build
        logger.warning("CPU decode-attention kernel in %s could not be loaded (%s); using the slower torch path",
                       target, exc)
        return None


@functools.cache
def compiled_kernel() -> ModuleType | None:
    """The compiled extension of this process (loaded once); None if it cannot be built here."""
    return load_kernel()


def decode_attention(q: torch.Tensor, k_tiles: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [num_heads, head_dim]; k_tiles: [num_kv_heads, tiles, head_dim, 16]; v: [num_kv_heads, length, head_dim].
    Returns [num_heads, head_dim]."""
    kernel = compiled_kernel()
    if kernel is not None:
        return kernel.decode_attention(q, k_tiles, v)
    return decode_attention_reference(q, untile_keys(k_tiles, v.shape[1]), v)


def prefixed_decode_attention(q: torch.Tensor, k_tiles: torch.Tensor, v: torch.Tensor,
                              prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """decode_attention over a prefix read in place from one layer of the prefix cache's host tier, then the
    request's own KV: prefix = (k, v [slots, num_kv_heads, head_dim] in any floating dtype, slots [P] int64, P a
    multiple of 16)."""
    prefix_k, prefix_v, slots = prefix
    kernel = compiled_kernel()
    if kernel is not None:
        return kernel.prefixed_decode_attention(q, k_tiles, v, prefix_k, prefix_v, slots)
    k = torch.cat([prefix_k.index_select(0, slots).to(q.dtype).transpose(0, 1), untile_keys(k_tiles, v.shape[1])], 1)
    v = torch.cat([prefix_v.index_select(0, slots).to(q.dtype).transpose(0, 1), v], 1)
    return decode_attention_reference(q, k, v)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain torch: q [num_heads, head_dim], k and v [num_kv_heads, length, head_dim]."""
    heads, head_dim = q.shape
    kv_heads = k.shape[0]
    scores = q.view(kv_heads, heads // kv_heads, head_dim) @ k.transpose(1, 2) * head_dim**-0.5
    return (scores.softmax(-1) @ v).reshape(heads, head_dim)


def tile_keys(k: torch.Tensor, capacity_tiles: int | None = None) -> torch.Tensor:
    """[num_kv_heads, length, head_dim] -> [num_kv_heads, tiles, head_dim, 16] (unused lanes zero)."""
    kv_heads, length, head_dim = k.shape
    tiles = max(capacity_tiles or 0, -(-length // TILE))
    padded = k.new_zeros(kv_heads, tiles * TILE, head_dim)
    padded[:, :length] = k
    return padded.view(kv_heads, tiles, TILE, head_dim).transpose(2, 3).contiguous()


def untile_keys(k_tiles: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of tile_keys: [num_kv_heads, length, head_dim]."""
    kv_heads, tiles, head_dim, _ = k_tiles.shape
    return k_tiles.transpose(2, 3).reshape(kv_heads, tiles * TILE, head_dim)[:, :length]
