# `make install` on a CPU machine; `make install-gpu` on a CUDA box. `make test` runs the fast
# suite, `make test-all` every test (what CI runs).
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install install-gpu test test-slow test-all test-diffusers test-reliability test-docker \
	quickstart

# torch first, so the project's own `torch>=2.13,<2.14` is already met: the CPU build from the
# PyTorch CPU index where it is reachable (scripts/install.sh says what happens where not)
install:
	PY=$(PY) TORCH=$(TORCH) EXTRAS=cpu,dev bash scripts/install.sh

install-gpu:
	PY=$(PY) TORCH=$(TORCH) EXTRAS=gpu,dev bash scripts/install.sh --gpu

# the fast suite: everything but the slow, reliability and Docker tests (<= 8 min on 2 idle
# cores); the modules that start servers and other processes run last (tests/conftest.py)
test:
	$(PY) -m pytest -q -m "not slow and not reliability and not docker" --durations=10  # the slowest tests, for CI time

# the tests marked slow (over ~10 s each on 2 idle cores: compiling, multi-node training, the
# LDM example's loop, ...)
test-slow:
	$(PY) -m pytest -q -m "slow and not reliability and not docker" --durations=10

# every test: the fast suite, the slow tests, diffusers parity, the reliability suite and CI's
# part of the Docker tests (what .ci/run runs)
test-all:
	$(MAKE) test
	$(MAKE) test-slow
	$(MAKE) test-diffusers
	$(MAKE) test-reliability
	$(MAKE) test-docker DOCKER_TEST_ARGS=--ci

# diffusers parity in its own venv without torchvision (scripts/test-diffusers.sh says why)
test-diffusers:
	PY=$(PY) bash scripts/test-diffusers.sh

# nginx + two real server replicas on loopback: load, faults, fuzz (~4 min on 2 cores; needs nginx)
test-reliability:
	$(PY) -m pytest -q -m reliability tests/reliability

# the CPU and nginx images built and run with a real Docker engine: image, curl examples,
# replicas behind nginx killed/stopped/crashed, memory limit (installs docker.io when root and
# missing, else skips; DOCKER_GPU=1 also builds the GPU image; --ci: CI's part)
test-docker:
	PY=$(PY) bash scripts/test-docker.sh $(DOCKER_TEST_ARGS)

quickstart:
	$(PY) -m train --cfg quickstart.yaml
