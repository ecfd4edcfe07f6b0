# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3

.PHONY: setup demo test bench-gpu

setup:
	@# the CPU build of torch first: a plain `torch` requirement would pull several GB of CUDA packages
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import importlib.metadata as m, triton, transformers; m.version('muse-compile')" 2>/dev/null \
		|| $(PY) -m pip install -q -e ".[test]"

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests
