#!/usr/bin/env bash
# The GPU checks, in one run of at most about 8 minutes on an H100 (a GPU machine is lent for minutes: run this,
# with a time limit that leaves room to run it again, and record what it prints in BENCHMARKS.md):
#   1. the GPU tests: the engine on CUDA, the Triton kernels compiled (not interpreted), decode graphs captured;
#   2. the decode step of random Llama-3-8B, bf16, 1k context, at batch 1, 16 and 64: MBU, graphs against eager,
#      host syncs per step, ops per layer (bench_gpu_step.py).
# Logs go to $OUT (or /tmp/gpu_check). Uses the python3 that holds a CUDA torch (PYTHON=... to choose another).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# The C++ extension (CPU kernels) is built first, with its own limit, so that no test waits on the build.
timeout 180 $PY -c "from omniserve.cpu_attention.kernel import build_kernel; build_kernel()" 2>&1 | tail -2
timeout 240 $PY -m pytest -q -x -p no:cacheprovider -k "not default_model" tests/test_gpu.py tests/test_triton_decode.py \
    tests/test_triton_ops.py tests/test_triton_prefill.py tests/test_graphs.py tests/test_decode_step.py \
    2>&1 | tee "$LOGS/tests.log"
tests=${PIPESTATUS[0]}
timeout 300 $PY benchmarks/bench_gpu_step.py --batches 1 16 64 --context 1024 --steps 48 \
    --markdown "$LOGS/gpu_step.md" 2>&1 | tee "$LOGS/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
