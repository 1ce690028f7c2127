# etherd: two commands for a newcomer (make run, make test), and the rest for the team.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Marker files: reinstall only when the packaging changes.
RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed
BENCH   := $(VENV)/.bench-installed

.PHONY: run test lint typecheck unit integration conformance openapi bench bench-micro \
	bench-fanout bench-client bench-peers clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUNTIME): pyproject.toml setup.py etherd/edge/ws/_directwrite.c | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(DEV): pyproject.toml setup.py etherd/edge/ws/_directwrite.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(RUNTIME)

$(BENCH): pyproject.toml $(DEV)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

## run: install etherd and serve on 127.0.0.1:8080 with the embedded SQLite store
run: $(RUNTIME)
	$(BIN)/etherd serve

## test: install the development tools (and the browser the UI tests drive), then lint,
## type-check and run the whole suite
test: $(DEV) lint typecheck
	sh tests/browser/ensure-browser.sh
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV)
	$(BIN)/mypy

unit: $(DEV)
	$(BIN)/python -m pytest tests/unit

integration: $(DEV)
	$(BIN)/python -m pytest tests/integration

conformance: $(DEV)
	bash tests/conformance/run.sh

## openapi: write the HTTP API's OpenAPI document (what GET /api/openapi.json serves)
openapi: $(RUNTIME)
	$(BIN)/etherd openapi > docs/openapi.json

## fuzz: every fuzz target of tests/fuzz for FUZZ_SECONDS each, from its seed corpus; what
## it learns goes to tests/fuzz/.work/corpus/<target>, crashes to tests/fuzz/.work/crashes
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := http_request ws_commands topics tokens
FUZZ_WORK    := tests/fuzz/.work
fuzz: $(DEV)
	@status=0; for target in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/corpus/$$target $(FUZZ_WORK)/crashes; \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		$(BIN)/python -m tests.fuzz.$$target -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=$(FUZZ_WORK)/crashes/$$target- -print_final_stats=1 \
			$(FUZZ_WORK)/corpus/$$target tests/fuzz/corpus/$$target || status=1; \
	done; exit $$status

## bench: the standard benchmark set (a few minutes), printed as a table
bench: bench-client bench-micro bench-fanout

bench-micro: $(BENCH)
	$(BIN)/python -m pytest bench/micro --benchmark-only -q -p no:cacheprovider

bench-fanout: $(BENCH) bench-client
	$(BIN)/python -m bench.fanout.matrix --quick

## bench-cluster: fan-out across etherd nodes over NATS, one throwaway PostgreSQL cluster
## (cross-node latency, cost of the bus, --workers scaling, idle memory; ~30 minutes)
.PHONY: bench-cluster
bench-cluster: $(BENCH) bench-client
	$(BIN)/python -m bench.fanout.cluster

## soak: mixed load (churning subscribers, publishers, harnesses) against one etherd on a
## throwaway PostgreSQL for SOAK_MINUTES, sampled each minute; writes bench/results/soak-*
SOAK_MINUTES ?= 30
.PHONY: soak
soak: $(BENCH)
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

## stress: the stress scenarios (tests/stress) on SQLite, PostgreSQL and a two-node
## cluster, each printing its invariant and figure (a few minutes)
.PHONY: stress
stress: $(DEV)
	$(BIN)/python -m pytest tests/stress

## bench-client: the C subscriber load client, built with the machine's gcc
SUBCLIENT := bench/.build/subclient
BENCH_CC  ?= gcc
bench-client: $(SUBCLIENT)

$(SUBCLIENT): bench/fanout/subclient.c
	@mkdir -p $(@D)
	$(BENCH_CC) -std=c11 -O2 -Wall -Wextra -Werror -o $@ $<

## bench-peers: the uWebSockets.js peer server's package (npm, pinned by the lock file)
UWS := bench/peers/uws
bench-peers: $(UWS)/node_modules/.package-lock.json

$(UWS)/node_modules/.package-lock.json: $(UWS)/package.json $(UWS)/package-lock.json
	cd $(UWS) && npm ci --ignore-scripts

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache data bench/.build
