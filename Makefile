# `make install` on a CPU machine; `make install-gpu` on a CUDA box. `make test` runs the suite.
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install install-gpu test quickstart

install:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[cpu,dev]'

install-gpu:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[gpu,dev]'

test:
	$(PY) -m pytest -q -m "not reliability"

quickstart:
	$(PY) -m train --cfg quickstart.yaml
