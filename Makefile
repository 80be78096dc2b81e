# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv, ingests the sample corpus and serves on 127.0.0.1:8000
#   make test   installs into .venv, then lint, types, layer contracts and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit slow bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lamina demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The browser test drives Debian's chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

slow: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m slow

test: lint unit slow

# Benchmarks print figures; they are not tests.
bench: $(STAMP)
	command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; } || echo "wrk unavailable: bench.gateway_overhead falls back to bench.loadgen"
	$(BIN)/python -m bench.chat_latency --requests 100
	$(BIN)/python -m bench.gateway_overhead
	$(BIN)/python -m bench.edge_overhead
	$(BIN)/python -m bench.injection_detection
	$(BIN)/python -m bench.tracing_overhead
	$(BIN)/python -m bench.retrieval_latency --sizes 10000,100000
	$(BIN)/python -m bench.ingestion_throughput
	command -v man >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq manpages manpages-dev man-db; } || echo "man pages unavailable: bench.retrieval_quality prints what it needs"
	$(BIN)/python -m bench.retrieval_quality
	$(BIN)/python -m bench.rag_turn
	$(BIN)/python -m bench.streaming_ttft
	$(BIN)/python -m bench.sse_concurrency
	$(BIN)/python -m bench.cold_start

# Ten minutes of chat, streams, ingestion and approvals against a model failing 10 % of
# calls: success rate, p99 and memory over time (bench/results/soak.png).
soak: $(STAMP)
	$(BIN)/python -m bench.soak --duration 600

clean:
	rm -rf $(VENV) .lamina .mypy_cache .pytest_cache .ruff_cache
