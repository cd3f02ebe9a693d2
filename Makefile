# `make install` on a CPU machine; `make install-gpu` on a CUDA box. `make test` runs the suite.
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install install-gpu test test-reliability quickstart

install:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[cpu,dev]'

install-gpu:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[gpu,dev]'

test:
	$(PY) -m pytest -q -m "not reliability"

# nginx + two real server replicas on loopback: load, faults, fuzz (~4 min on 2 cores; needs nginx)
test-reliability:
	$(PY) -m pytest -q -m reliability tests/reliability

quickstart:
	$(PY) -m train --cfg quickstart.yaml
