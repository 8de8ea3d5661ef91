# Quickstart targets. Each creates or reuses .venv and installs what it needs.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first
# (a bare `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STUBS := .stubs

.PHONY: install demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/quantkit demo

# TensorRT 10.13 type stubs for mypy, from PyPI (tensorrt-stubs, --no-deps), patched to parse
$(STUBS)/tensorrt: tools/prepare_tensorrt_stubs.py | install
	$(PY) tools/prepare_tensorrt_stubs.py $(STUBS)

lint: install
	$(PY) -m ruff check quantkit tests benchmarks tools

typecheck: install $(STUBS)/tensorrt
	$(PY) -m mypy quantkit/backends/tensorrt

test: lint typecheck
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(STUBS) .pytest_cache .mypy_cache .ruff_cache
