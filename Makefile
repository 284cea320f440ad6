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

.PHONY: install test test-fast lint proto proto-check buf-lint

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
