# batcher — `make demo` and `make test` work on a machine with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
SRC    := batcher workers tests bench migrations

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/ruff check $(SRC)
	$(BIN)/mypy --strict batcher workers

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)
	@if [ -z "$$BATCHER_TEST_POSTGRES_URL" ]; then \
	  echo "note: the PostgreSQL suite was not run (set BATCHER_TEST_POSTGRES_URL, as .ci/run does)"; fi

demo: $(STAMP)
	$(BIN)/batcher demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
