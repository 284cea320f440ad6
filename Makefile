# hfl: one entry point for install, test, lint, proto and demo.
# Needs only python3.11 and make: `make install` bootstraps uv into .tools/
# and installs the locked workspace (uv.lock) into .venv/.

PYTHON ?= python3.11
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
BUF_VERSION := 1.47.2
BUF := node_modules/.bin/buf

.PHONY: help install test test-fast lint proto proto-check buf-breaking demo bench chaos
.DEFAULT_GOAL := help

help:
	@echo "make demo         run a whole local federation (simulated SGX) and check it reaches 95%"
	@echo "make test         install (uv.lock) and run every test, slow ones included"
	@echo "make test-fast    the tests not marked slow"
	@echo "make lint         ruff, ruff format --check, mypy --strict, buf lint, buf breaking"
	@echo "make proto        regenerate the hfl.v1 Python code;  make proto-check: fail if stale"
	@echo "make bench        benchmarks (ratios against a baseline in the same run)"
	@echo "make chaos        the fault and attack suite (tests/chaos; also part of make test)"
	@echo "make up / down    docker compose: PROFILE=simulated (default) or sgx (docs/deployment.md)"
	@echo "make base-images  hfl's own base images from Debian packages (offline hosts; root)"
	@echo "make manifests sign policy sgx-images   Gramine SGX builds (docs/deployment.md)"

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) uv.lock pyproject.toml services/*/pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

install: $(VENV)/.installed

$(BUF):
	npm install --no-save --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

# The README's test command. Slow tests (real TensorFlow, multi-process
# federations) are included: CI runs everything.
test: install
	$(PY) -m pytest -q

# The first thing to run: a whole federation on this machine (simulated SGX,
# 2 trainers, bundled digits data), which must reach 95% test accuracy.
demo: install
	$(VENV)/bin/hfl run --expect-accuracy 0.95

# Benchmarks: ratios against a baseline measured in the same run (docs/performance.md).
# bench_e2e is what users get: a real aggregator process, no-op trainers on the real
# client over mutual RA-TLS, against a raw TLS socket (results in benchmarks/results/).
bench: install
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_e2e.py --only resnet --append
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_codec.py
	$(PY) benchmarks/bench_fold_memory.py
	$(PY) benchmarks/bench_attestation.py
	$(PY) benchmarks/bench_trainer_throughput.py --quick
	$(PY) benchmarks/bench_compression.py

# The fault and attack suite: issue 11's attacks against real servers, a TCP proxy that
# stalls and cuts connections, parser fuzzing. A few minutes; CI runs it in `make test`.
chaos: install
	$(PY) -m pytest -q -m chaos tests/chaos

# Everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services tests benchmarks scripts
	$(BUF) lint
	$(MAKE) --no-print-directory buf-breaking

# Breaking-change check against main, once main has the hfl.v1 package.
buf-breaking: $(BUF)
	@if git rev-parse --verify -q main >/dev/null && git cat-file -e main:protos/hfl/v1 2>/dev/null; then \
		$(BUF) breaking --against '.git#branch=main'; \
	else echo "buf breaking: main has no protos/hfl/v1 yet; nothing to compare"; fi

proto: install
	$(PY) scripts/gen_protos.py

proto-check: install
	$(PY) scripts/gen_protos.py --check

include gramine/gramine.mk
include deploy/deploy.mk
