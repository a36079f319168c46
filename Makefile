# Two commands work on a fresh machine: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build that lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# --overwrite: each `make demo` starts runs/demo afresh (scalelab never overwrites a run unasked)
	$(VENV)/bin/scalelab pretrain --config configs/demo.toml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/shakespeare_char.py

clean:
	rm -rf $(VENV) runs build *.egg-info
