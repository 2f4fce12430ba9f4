# Two commands: `make demo` (the main job) and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench setup clean

setup: $(STAMP)

# torch is installed first and pinned so that pip never resolves a (multi-GB) CUDA build;
# the package itself then installs without build isolation, against that torch.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/finetune.py --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs build *.egg-info
