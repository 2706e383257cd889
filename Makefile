# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

# XLA's CUDA compiler and ptxas (no driver or system toolkit needed) for
# tests/test_cuda_compile.py, installed beside the venv (--target) so that only that test's
# subprocess sees it; Linux wheels only.
CUDA_COMPILER := $(VENV)/cuda-compiler

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

$(CUDA_COMPILER)/.installed: $(STAMP)
	@if [ "$$(uname -s)" = Linux ]; then \
	  v=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && rm -rf $(CUDA_COMPILER) && \
	  $(PY) -m pip install -q --no-deps --target $(CUDA_COMPILER) "jax-cuda12-pjrt==$$v" \
	    "jax-cuda12-plugin==$$v" "nvidia-cuda-nvcc-cu12>=12.6.85,<13" && touch $@; \
	else echo "No CUDA compiler wheels for $$(uname -s): tests/test_cuda_compile.py skips."; fi

demo: $(STAMP)
	$(VENV)/bin/jlora demo

test: $(STAMP) $(CUDA_COMPILER)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.ops

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
