# The two commands of the README: `make demo` (the main job) and `make test`. Both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all check bench render
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m feedserve demo $(ARGS)

# Style and types first (a few seconds; scripts/check.sh), then pytest.
test: setup check
	$(PY) -m pytest $(ARGS)

check: setup
	bash scripts/check.sh

# Everything, the real-model (slow) tests included; no GPU tests.
test-all: setup
	$(PY) -m pytest -m "not gpu" $(ARGS)

render:
	$(PY) -m feedserve render

bench:
	bash scripts/setup.sh --bench
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.speed_cpu --posts 128
