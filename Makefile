# Two commands work on a fresh machine: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BROWSER := $(VENV)/.browser
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build that lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The web chat test drives Debian's chromium through Playwright (which never downloads a browser here).
$(BROWSER): $(STAMP)
	[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y chromium chromium-driver; }
	touch $(BROWSER)

demo: $(STAMP)
	# --overwrite: each `make demo` starts runs/demo afresh (scalelab never overwrites a run unasked)
	$(VENV)/bin/scalelab pretrain --config configs/demo.toml --overwrite

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/shakespeare_char.py
	$(PY) bench/parallel.py
	$(PY) bench/serve_load.py
	$(PY) -m pip install -q -e '.[trl]'  # TRL is an optional extra used only by this benchmark
	OMP_NUM_THREADS=1 $(PY) bench/grpo_vs_trl.py

clean:
	rm -rf $(VENV) runs build *.egg-info
