# Two commands do all the set-up: `make run` (install and serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: run test fuzz bench lint proto docker-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Two distributions: the client (./client: SDK, gradient.v1, gradient-client) and the server
# (.), which depends on the client by name; the client is not on PyPI, so both go in together.
$(VENV)/.installed-run: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ./client -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ./client -e ".[test]"
	touch $@

run: $(VENV)/.installed-run  ## install the server and serve on $(HOST):$(PORT)
	$(BIN)/gradient-server --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test  ## install everything and run the tests
	$(BIN)/python -m pytest

fuzz: $(VENV)/.installed-test  ## the fuzzers, with FUZZ_EXAMPLES (default 20000) examples each
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(BIN)/python -m pytest tests/test_fuzz.py tests/test_byte_fuzz.py

# Benchmarks compare with floors measured in the same run; OpenBLAS tuning variables are unset
# for every side alike. bench_engine.py runs the engine in-process against hand-written numpy,
# PyTorch and JAX (workloads A-D and the big chains of issue 11, each side in its own process
# for its peak RSS); it takes minutes (workload D, the 1,000,000-node chain).
bench: $(VENV)/.installed-test  ## the serving benchmarks (vs bare gRPC) and the engine's (vs numpy)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_serving.py
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_engine.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: $(VENV)/.installed-test  ## regenerate client/gradient/v1 from protos/
	$(BIN)/python scripts/generate_protos.py

# Needs a Docker daemon and the base image present locally (nothing is pulled); without them it
# says it SKIPPED (exit 0, or 1 with DOCKER_TEST_REQUIRED=1). tests/test_container_run.py runs
# the image's contents without a daemon as part of `make test`.
docker-test: $(VENV)/.installed-run  ## build the image, run it read-only, check health, a call and stop
	$(BIN)/python scripts/docker_test.py

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info server/*.egg-info
