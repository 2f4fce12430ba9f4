# Two commands: `make demo` (the main job) and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
DEMO_STAMP  := $(VENV)/.installed-demo
DEV_STAMP   := $(VENV)/.installed-dev
# The native capture extension (csrc/), built ahead of time against the installed torch into
# FLOPCOUNT_NATIVE_CACHE (`flopcount build-native`); optional: when it does not build, flopcount
# uses the dispatch backend and the native tests are skipped.
NATIVE_STAMP := $(VENV)/.native-built

.PHONY: demo test bench setup clean

setup: $(DEV_STAMP) $(NATIVE_STAMP)

# torch is installed first and pinned so that pip never resolves a (multi-GB) CUDA build;
# the package itself then installs without build isolation, against that torch.
$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	touch $@

# The demo needs only the Hugging Face stack; tests need everything (DeepSpeed, Lightning, ...).
$(DEMO_STAMP): $(TORCH_STAMP) pyproject.toml setup.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[hf,report]"
	touch $@

$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml setup.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@ $(DEMO_STAMP)

$(NATIVE_STAMP): $(DEMO_STAMP) $(wildcard csrc/*.cpp csrc/*.h) flopcount/capture/native/builder.py
	$(PY) -m flopcount.cli build-native || true
	touch $@

# A fresh trace directory each time: reopening one appends a segment (a resumed run).
demo: $(DEMO_STAMP) $(NATIVE_STAMP)
	rm -rf runs/demo
	$(PY) demo/finetune.py --out runs/demo

test: $(DEV_STAMP) $(NATIVE_STAMP)
	$(PY) -m pytest -q --timeout=900 tests

bench: $(DEV_STAMP) $(NATIVE_STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs build *.egg-info
