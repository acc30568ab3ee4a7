"""The benchmarks' --smoke size (tests/test_benchmarks_smoke.py runs every script at it): the engine settings that the
scripts whose engines plan with a latency profile share, so that one profile, measured once per machine and cached,
serves them all."""

SMOKE_MAX_MODEL_LEN = 512
SMOKE_MAX_NUM_BATCHED_TOKENS = 64
SMOKE_ENGINE_FLAGS = f"--max-model-len {SMOKE_MAX_MODEL_LEN} --max-num-batched-tokens {SMOKE_MAX_NUM_BATCHED_TOKENS}"
"""The same settings as server flags."""
