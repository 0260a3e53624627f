# burnmeter: `make run` starts the metering proxy, `make test` runs every check and test.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test check lint format bench clean

$(VENV)/.installed: pyproject.toml
	@echo "burnmeter: installing into $(VENV) (the first time takes a minute or two)"
	@python=$$(scripts/find-python) || exit 1; \
	  [ -x $(PY) ] || $$python -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

run: $(VENV)/.installed  ## the proxy on 127.0.0.1:8080, embedded store (more mitmdump flags: ARGS)
	$(BIN)/mitmdump --listen-host 127.0.0.1 -s addons/metering.py --set connection_strategy=lazy $(ARGS)

check: $(VENV)/.installed  ## lint, format and type checks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check  ## every check, then the whole test suite (slow end-to-end tests included)
	$(BIN)/pytest -q $(ARGS)

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed  ## quick proxy benchmark (full run: python scripts/bench_proxy.py)
	$(PY) scripts/bench_proxy.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
